"""CPU decode kernels over packed quantized weights vs their torch references; the ops' CPU kernels in models."""

import pytest
import torch

from sparsefx.codegen.cpu import enable_cpu_kernels, prepare_cpu_decode
from sparsefx.ops.quant import cpu as qg
from sparsefx.ops.routed.cpu import cpu_supports_kernels
from sparsefx.ops.quant.op import lowrank_quant_linear_math, quant_linear_math
from sparsefx.ops.quant.format import QuantSpec
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.passes.quant import quantize_rtn
from sparsefx.pipeline import compress

needs_kernel = pytest.mark.skipif(not cpu_supports_kernels(), reason="the C++ kernel needs AVX2/FMA/F16C")


def _count_kernel_calls(monkeypatch) -> list:
    """Record every call of the packed-code kernels' Python entry points."""
    calls = []
    for name in ("quant_matmul", "lowrank_quant_matmul"):
        real = getattr(qg, name)
        monkeypatch.setattr(qg, name, lambda *a, _real=real, **k: calls.append(a[0].shape) or _real(*a, **k))
    return calls


def _packed(rows, cols, bits, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(rows, cols, generator=g), QuantSpec(bits, group, symmetric))


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, in_f", [(32, 96), (64, 576), (96, 288), (192, 1536)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_matmul_matches_the_reference(bits, group, in_f, symmetric):
    seed = bits * 1000 + group + in_f + symmetric
    qw = _packed(61, in_f, bits, group, symmetric, seed)     # prime row count: uneven split between threads
    for rows in (1, 3, 5, qg.MAX_ROWS):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed + rows))
        got = qg.quant_matmul(x, qw.packed, qw.scales, qw.zeros, bits, group)
        want = qg.quant_matmul_reference(x.double(), qw.packed, qw.scales, qw.zeros, bits, group)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_gemv_t_adds_the_low_rank_product_in_place(bits, symmetric):
    at = _packed(7, 192, bits, 64, symmetric, bits)            # A^T: rank 7, 192 outputs, groups along the outputs
    u = torch.randn(2, 7)
    y0 = torch.randn(2, 192)
    y = y0.clone()
    assert qg.quant_gemv_t(u, at.packed, at.scales, at.zeros, bits, 64, out=y) is y
    want = y0.double() + qg.quant_gemv_t_reference(u.double(), at.packed, at.scales, at.zeros, bits, 64)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    fresh = qg.quant_gemv_t(u, at.packed, at.scales, at.zeros, bits, 64)
    torch.testing.assert_close(fresh.double(), want - y0.double(), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("main_bits", [None, 2, 3, 4])
@pytest.mark.parametrize("factor_bits", [3, 4, 8])
def test_fused_lowrank_quant_matmul_matches_the_reference(main_bits, factor_bits):
    seed = (main_bits or 0) * 10 + factor_bits
    at, b = _packed(5, 96, factor_bits, 32, False, seed), _packed(5, 160, factor_bits, 32, True, seed + 1)
    main = (None, None, None) if main_bits is None else (lambda q: (q.packed, q.scales, q.zeros))(
        _packed(96, 160, main_bits, 32, False, seed + 2))
    d = torch.rand(5) + 0.5
    for rows in (1, 4, 7):
        x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(seed + rows))
        args = (*main, main_bits or 4, 32, at.packed, at.scales, at.zeros, d, b.packed, b.scales, b.zeros,
                factor_bits, 32)
        got = qg.lowrank_quant_matmul(x, *args)
        want = qg.lowrank_quant_matmul_reference(x.double(), *args)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_inputs_the_kernel_does_not_take_use_the_reference():
    qw = _packed(5, 64, 4, 32, False, 0)
    many = torch.randn(qg.MAX_ROWS + 1, 64)               # a GEMM: dequantize once
    half = torch.randn(1, 64).half()
    assert not qg.kernel_available(many, qw.packed, qw.scales, qw.zeros, 4)
    assert not qg.kernel_available(half, qw.packed, qw.scales, qw.zeros, 4)
    torch.testing.assert_close(qg.quant_matmul(many, qw.packed, qw.scales, qw.zeros, 4, 32),
                               qg.quant_matmul_reference(many, qw.packed, qw.scales, qw.zeros, 4, 32))


@needs_kernel
def test_kernel_refuses_inconsistent_operands():
    qw = _packed(5, 64, 4, 32, False, 0)
    ext = qg.extension()
    with pytest.raises(RuntimeError, match="packed must be"):
        ext.quant_matmul(torch.randn(1, 64), qw.packed[:, :-1].contiguous(), qw.scales, qw.zeros, 4, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        ext.quant_matmul(torch.randn(1, 64), qw.packed, qw.scales.float(), qw.zeros, 4, 32)


@needs_kernel
def test_registered_op_kernels_take_decode_and_match_the_default_implementation(monkeypatch):
    enable_cpu_kernels()
    calls = _count_kernel_calls(monkeypatch)
    qw = _packed(37, 128, 3, 64, False, 3)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(37, generator=g)
    x = torch.randn(1, 1, 128, generator=g)
    got = torch.ops.sparsefx.quant_linear(x, qw.packed, qw.scales, qw.zeros, bias, 3, 64)
    assert calls == [(1, 1, 128)]
    # fp32 sums in another order than the dense GEMM's: compare at the other kernel tests' tolerance
    torch.testing.assert_close(got, quant_linear_math(x, qw.packed, qw.scales, qw.zeros, bias, 3, 64),
                               rtol=1e-5, atol=1e-4)
    prefill = torch.randn(2, 9, 128)                     # 18 rows: the default implementation
    torch.testing.assert_close(torch.ops.sparsefx.quant_linear(prefill, qw.packed, qw.scales, qw.zeros, bias, 3, 64),
                               quant_linear_math(prefill, qw.packed, qw.scales, qw.zeros, bias, 3, 64))
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lead", [(1, 1), (3, 5), (2, 17)])     # decode, small batch, prefill (dequant + GEMM)
def test_cpp_registered_op_computes_the_quant_linear(bits, symmetric, lead):
    op = qg.cpp_quant_linear()
    assert op is not None, "the C++ extension must build on this CPU (AVX2/FMA/F16C)"
    qw = _packed(37, 192, bits, 32 if bits != 8 else 96, symmetric, seed=bits + 10 * len(lead))
    g = torch.Generator().manual_seed(sum(lead))
    x, bias = torch.randn(*lead, 192, generator=g), torch.randn(37, generator=g)
    group = qw.spec.group_size
    for b in (bias, None):
        ref = quant_linear_math(x, qw.packed, qw.scales, qw.zeros, b, bits, group)
        torch.testing.assert_close(op(x, qw.packed, qw.scales, qw.zeros, b, bits, group), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8"):
        op(x, qw.packed, qw.scales, qw.zeros, None, 5, group)
    with pytest.raises(RuntimeError, match="features"):
        op(x[..., :160], qw.packed, qw.scales, qw.zeros, None, bits, group)


def _lowrank_args(with_main, factor_bits, out, in_f, rank, seed):
    """Stored tensors of a ``lowrank_quant_linear`` (main 3-bit group 32 or none; factors fp16 or packed, group 32)
    and a bias, in the op's argument order."""
    g = torch.Generator().manual_seed(seed)
    if factor_bits == 16:
        at = (torch.randn(rank, out, generator=g).half(), None, None)
        b = (torch.randn(rank, in_f, generator=g).half(), None, None)
    else:
        at_q, b_q = _packed(rank, out, factor_bits, 32, False, seed + 1), _packed(rank, in_f, factor_bits, 32, True,
                                                                                  seed + 2)
        at, b = (at_q.packed, at_q.scales, at_q.zeros), (b_q.packed, b_q.scales, b_q.zeros)
    main = _packed(out, in_f, 3, 32, False, seed + 3)
    return (((main.packed, main.scales, main.zeros) if with_main else (None, None, None)) + at
            + (torch.rand(rank, generator=g) + 0.5,) + b + (torch.randn(out, generator=g),))


@needs_kernel
@pytest.mark.parametrize("with_main", [True, False])
@pytest.mark.parametrize("factor_bits", [3, 4, 16])
@pytest.mark.parametrize("lead", [(1, 1), (3, 2), (2, 11)])     # decode, small batch, prefill (dequant + GEMMs)
def test_cpp_registered_op_computes_the_lowrank_quant_linear(with_main, factor_bits, lead):
    op = qg.cpp_lowrank_quant_linear()
    assert op is not None, "the C++ extension must build on this CPU (AVX2/FMA/F16C)"
    args = _lowrank_args(with_main, factor_bits, out=96, in_f=160, rank=5, seed=factor_bits + 7 * len(lead))
    x = torch.randn(*lead, 160, generator=torch.Generator().manual_seed(sum(lead)))
    attrs = (3, 32, factor_bits, 32)
    for bias in (args[-1], None):
        ref = lowrank_quant_linear_math(x.double(), *args[:-1], bias, *attrs)
        got = op(x, *args[:-1], bias, *attrs)
        assert got.shape == (*lead, 96) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    # another dtype takes the GEMMs in that dtype
    torch.testing.assert_close(op(x.double(), *args, *attrs), lowrank_quant_linear_math(x.double(), *args, *attrs))


@needs_kernel
def test_cpp_lowrank_op_names_inconsistent_operands():
    op = qg.cpp_lowrank_quant_linear()
    args = list(_lowrank_args(True, 4, out=64, in_f=128, rank=4, seed=0))
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match=r"r = d.numel\(\) = 5"):
        op(x, *args[:6], torch.ones(5), *args[7:], 3, 32, 4, 32)
    with pytest.raises(RuntimeError, match="factor_bits"):
        op(x, *args, 3, 32, 5, 32)
    with pytest.raises(RuntimeError, match="main weight has 32 rows, the factors 64"):
        main = _packed(32, 128, 3, 32, False, 1)
        op(x, main.packed, main.scales, main.zeros, *args[3:], 3, 32, 4, 32)
    with pytest.raises(RuntimeError, match="x has 96 features, B packs 128"):
        op(torch.randn(1, 96), *args, 3, 32, 4, 32)
    with pytest.raises(RuntimeError, match="positive multiple of 32"):   # not a division by zero
        op(x, *args, 3, 32, 4, 0)


@needs_kernel
@pytest.mark.parametrize("with_main", [True, False])
@pytest.mark.parametrize("factor_bits", [4, 16])
def test_registered_lowrank_kernel_matches_the_default_implementation(with_main, factor_bits, monkeypatch):
    enable_cpu_kernels()
    calls = _count_kernel_calls(monkeypatch)
    main = _packed(64, 128, 3, 64, False, 6)
    if factor_bits == 16:
        at = (torch.randn(6, 64).half(), None, None)
        b = (torch.randn(6, 128).half(), None, None)
    else:
        at_q, b_q = _packed(6, 64, 4, 32, False, 7), _packed(6, 128, 4, 32, True, 8)   # one factor_group
        at, b = (at_q.packed, at_q.scales, at_q.zeros), (b_q.packed, b_q.scales, b_q.zeros)
    args = ((main.packed, main.scales, main.zeros) if with_main else (None, None, None)) + at + (
        torch.rand(6) + 0.5,) + b + (torch.randn(64),)
    group = 32
    xs = (torch.randn(1, 128), torch.randn(3, 1, 128), torch.randn(4, 5, 128))
    gots = [torch.ops.sparsefx.lowrank_quant_linear(x, *args, 3, 64, factor_bits, group) for x in xs]
    # the two small batches take the kernel (fp16 factors: only the main weight's); 20 rows take the GEMMs
    assert len(calls) == 2 * (with_main if factor_bits == 16 else 1)
    for x, got in zip(xs, gots):
        torch.testing.assert_close(got, lowrank_quant_linear_math(x, *args, 3, 64, factor_bits, group),
                                   rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("recipe", ["{method: rtn, bits: 3, group_size: 32}",
                                    "{method: dam, budget: 5.0, bits: 3, group_size: 32, factor_group: 32}",
                                    "{method: l_then_q, budget: 5.0, bits: 3, group_size: 32}"])
def test_prepared_quantized_model_decodes_through_the_kernel_with_the_same_outputs(recipe):
    from sparsefx.ops.quant.eager import LowRankQuantLinear, QuantLinear

    model = tiny_model("llama")
    compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), calibration=torch.randint(0, 256, (8, 32)),
             progress=False)
    prompt = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(prompt, use_cache=True)
        ref_next = model(prompt[:, -1:] * 0 + 5, past_key_values=ref.past_key_values, use_cache=True).logits
    assert prepare_cpu_decode(model) == 7 * model.config.num_hidden_layers
    calls = []
    for m in model.modules():
        if isinstance(m, (QuantLinear, LowRankQuantLinear)):   # the C++-registered op, called directly
            assert m.decode_kernel in (qg.cpp_quant_linear(), qg.cpp_lowrank_quant_linear())
            m.decode_kernel = lambda x, *a, _k=m.decode_kernel: calls.append(x.shape) or _k(x, *a)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        nxt = model(prompt[:, -1:] * 0 + 5, past_key_values=out.past_key_values, use_cache=True).logits
    # every linear of the decode step went through the kernel (the prompt's calls too: the op takes prefill)
    assert sum(tuple(shape[:2]) == (1, 1) for shape in calls) == 7 * model.config.num_hidden_layers
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref_next, rtol=1e-4, atol=1e-4)


# ---- int8 activations (quant_matmul_q8, sparsefx_cpu::quant_linear_q8)

def test_round_activations_int8_rounds_each_block_of_32_to_its_own_step():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(7)) * torch.tensor([1.0, 50.0, 1e-3]).repeat(32)
    x[1, 32:64] = 0.0                                           # an all-zero block stays zero (no 0/0)
    r = qg.round_activations_int8(x)
    steps = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert torch.equal(r[1, 32:64], torch.zeros(32))
    ratio = (r.reshape(3, 3, 32) / steps.clamp_min(1e-30))       # whole steps, at most 127 of them
    assert torch.allclose(ratio, ratio.round(), atol=1e-3) and ratio.abs().max() <= 127 + 1e-3
    assert ((r - x).reshape(3, 3, 32).abs() <= steps / 2 * (1 + 1e-5)).all()


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, in_f", [(32, 96), (64, 576), (96, 288), (192, 1536)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_activation_kernel_matches_its_reference(bits, group, in_f, symmetric):
    seed = bits * 1000 + group + in_f + symmetric + 1
    qw = _packed(61, in_f, bits, group, symmetric, seed)     # prime row count; the last 3-bit chunk ends the buffer
    for rows in (1, 3, 5, qg.MAX_ROWS):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed + rows))
        x[0, 32:64] = 0.0                                     # a block whose step is 0
        got = qg.quant_matmul_q8(x, qw.packed, qw.scales, qw.zeros, bits, group)
        want = qg.quant_matmul_q8_reference(x, qw.packed, qw.scales, qw.zeros, bits, group)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        # and it is the product over the rounded x, not over x: the fp32 result differs by more than the tolerance
        exact = qg.quant_matmul_reference(x.double(), qw.packed, qw.scales, qw.zeros, bits, group)
        assert (got.double() - exact).abs().max() > 1e-3


@needs_kernel
def test_int8_activation_kernel_refuses_what_it_cannot_take():
    qw = _packed(16, 64, 4, 32, False, 0)
    with pytest.raises(ValueError, match="MAX_ROWS"):
        qg.quant_matmul_q8(torch.randn(qg.MAX_ROWS + 1, 64), qw.packed, qw.scales, qw.zeros, 4, 32)
    with pytest.raises(ValueError, match="fp32"):
        qg.quant_matmul_q8(torch.randn(1, 64, dtype=torch.float64), qw.packed, qw.scales, qw.zeros, 4, 32)


@needs_kernel
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("lead", [(1, 1), (3, 5), (2, 17)])     # decode, small batch, prefill (dequant + GEMM)
def test_cpp_int8_activation_op_rounds_decode_rows_only(bits, lead):
    op = qg.cpp_quant_linear(int8_activations=True)
    assert op is torch.ops.sparsefx_cpu.quant_linear_q8.default
    qw = _packed(37, 192, bits, 64, False, seed=bits + 3 * len(lead))
    g = torch.Generator().manual_seed(sum(lead) + 1)
    x, bias = torch.randn(*lead, 192, generator=g), torch.randn(37, generator=g)
    got = op(x, qw.packed, qw.scales, qw.zeros, bias, bits, 64)
    decode = x.numel() // 192 <= qg.MAX_ROWS
    want = quant_linear_math(qg.round_activations_int8(x) if decode else x, qw.packed, qw.scales, qw.zeros, bias,
                             bits, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("entry, kind, op", [
    ("{method: rtn, bits: 4, group_size: 32}", "QuantLinear", "quant_linear_q8"),
    ("{method: dam, budget: 5.0, bits: 3, group_size: 32, factor_group: 32}", "LowRankQuantLinear",
     "lowrank_quant_linear_q8")])
def test_prepared_model_with_int8_activations_decodes_through_the_q8_op(entry, kind, op):
    model = tiny_model("llama")
    compress(model, Recipe.from_yaml(f"passes: [{entry}]"), calibration=torch.randint(0, 256, (8, 32)),
             progress=False)
    prompt = torch.randint(0, 256, (1, qg.MAX_ROWS + 5))   # more rows than the kernel takes: a GEMM
    with torch.no_grad():
        ref = model(prompt, use_cache=True)
        ref_next = model(prompt[:, -1:] * 0 + 5, past_key_values=ref.past_key_values, use_cache=True).logits
    prepare_cpu_decode(model, int8_activations=True)
    q8 = getattr(torch.ops.sparsefx_cpu, op).default
    linears = [m for m in model.modules() if type(m).__name__ == kind]
    assert len(linears) == 7 * model.config.num_hidden_layers and all(m.decode_kernel is q8 for m in linears)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        nxt = model(prompt[:, -1:] * 0 + 5, past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)   # prefill: exact x
    assert not torch.allclose(nxt, ref_next, rtol=1e-5, atol=1e-5)             # decode: rounded x ...
    torch.testing.assert_close(nxt, ref_next, rtol=0.05, atol=0.05)            # ... close to the exact step
    assert (nxt.argmax(-1) == ref_next.argmax(-1)).all()


# ---- int8 activations for DAM's linear (lowrank_quant_matmul_q8, sparsefx_cpu::lowrank_quant_linear_q8)

@needs_kernel
@pytest.mark.parametrize("main_bits", [None, 3, 4])
@pytest.mark.parametrize("factor_bits", [3, 4, 8])
def test_int8_activation_lowrank_kernel_matches_its_reference(main_bits, factor_bits):
    seed = (main_bits or 0) * 10 + factor_bits + 500
    # the factors' groups (64) differ from the main weight's (32), and so may their bits: each product that reads x
    # rounds it in its own lane order
    at, b = _packed(5, 128, factor_bits, 64, False, seed), _packed(5, 192, factor_bits, 64, True, seed + 1)
    main = (None, None, None) if main_bits is None else (lambda q: (q.packed, q.scales, q.zeros))(
        _packed(128, 192, main_bits, 32, False, seed + 2))
    d = torch.rand(5) + 0.5
    args = (*main, main_bits or 4, 32, at.packed, at.scales, at.zeros, d, b.packed, b.scales, b.zeros, factor_bits,
            64)
    for rows in (1, 4, qg.MAX_ROWS):
        x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(seed + rows))
        x[0, 64:96] = 0.0                                     # a block whose step is 0
        got = qg.lowrank_quant_matmul_q8(x, *args)
        want = qg.lowrank_quant_matmul_q8_reference(x, *args)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        exact = qg.lowrank_quant_matmul_reference(x.double(), *args)
        assert (got.double() - exact).abs().max() > 1e-3    # the product over the rounded x, not over x
    with pytest.raises(ValueError, match="MAX_ROWS"):
        qg.lowrank_quant_matmul_q8(torch.randn(qg.MAX_ROWS + 1, 192), *args)


@needs_kernel
@pytest.mark.parametrize("factor_bits", [4, 16])
@pytest.mark.parametrize("lead", [(1, 1), (3, 2), (2, 11)])     # decode, small batch, prefill (dequant + GEMMs)
def test_cpp_int8_activation_lowrank_op_rounds_decode_rows_only(factor_bits, lead):
    op = qg.cpp_lowrank_quant_linear(int8_activations=True)
    assert op is torch.ops.sparsefx_cpu.lowrank_quant_linear_q8.default
    args = _lowrank_args(True, factor_bits, out=96, in_f=160, rank=5, seed=factor_bits + 3 * len(lead))
    x = torch.randn(*lead, 160, generator=torch.Generator().manual_seed(sum(lead) + 2))
    attrs = (3, 32, factor_bits, 32)
    got = op(x, *args, *attrs)
    rx = qg.round_activations_int8(x) if x.numel() // 160 <= qg.MAX_ROWS else x
    # packed factors read the rounded x too; fp16 factors (a GEMM) read x as it is
    low_x = rx if factor_bits != 16 else x
    want = (lowrank_quant_linear_math(low_x.double(), None, None, None, *args[3:], *attrs)
            + quant_linear_math(rx.double(), *args[:3], None, 3, 32))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
