"""Triton dequant-matmul with the low-rank epilogue against the reference, every packed width; the ops."""

import pytest
import torch

pytest.importorskip("triton")

import sparsefx.ops  # noqa: E402,F401  (registers sparsefx::quant_linear / lowrank_quant_linear)
from sparsefx.ops.quant.triton import (Packed, default_config, default_gemv_config, gemv_eligible, quant_gemv, quant_matmul, quant_matmul_reference, triton_lowrank_quant_linear, triton_quant_linear)
from sparsefx.ops.quant.format import QuantSpec  # noqa: E402
from sparsefx.passes.quant import quantize_rtn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 math on both sides (the kernel dequantizes to fp32 and accumulates in fp32): only summation order differs


def _packed(rows, cols, bits, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(rows, cols, generator=g), QuantSpec(bits, group, symmetric))
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return Packed(to(qw.packed), to(qw.scales), to(qw.zeros), bits, group)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3, 19])
def test_matches_reference_every_width(bits, symmetric, m):
    p = _packed(37, 96, bits, 32, symmetric, seed=bits * 10 + m)        # 37 outputs: not a block multiple
    g = torch.Generator().manual_seed(m)
    x, bias = torch.randn(m, 96, generator=g).to(DEVICE), torch.randn(37, generator=g).to(DEVICE)
    ref = quant_matmul_reference(x, p, bias)
    # the reference itself is checked against the format's own dequantization
    torch.testing.assert_close(ref, x @ p.dense().T + bias)
    for cfg in (None, {"BLOCK_M": 1 if m < 16 else 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4}):
        out = torch.full((m, 37), float("nan"), device=DEVICE)
        torch.testing.assert_close(quant_matmul(x, p, bias, config=cfg, out=out), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("factor_bits", [16, 4, 3])
@pytest.mark.parametrize("with_main", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (3, 7)])
def test_lowrank_op_matches_the_ir_op(factor_bits, with_main, lead):
    n, k, r = 64, 96, 5
    g = torch.Generator().manual_seed(factor_bits + 2 * with_main + lead[1])
    main = _packed(n, k, 3, 32, True, seed=1) if with_main else None
    if factor_bits == 16:
        at = (torch.randn(r, n, generator=g).half().to(DEVICE), None, None)
        b = (torch.randn(r, k, generator=g).half().to(DEVICE), None, None)
    else:
        pa, pb = _packed(r, n, factor_bits, 32, False, seed=2), _packed(r, k, factor_bits, 32, False, seed=3)
        at, b = (pa.packed, pa.scales, pa.zeros), (pb.packed, pb.scales, pb.zeros)
    d = torch.rand(r, generator=g).half().to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    x = torch.randn(*lead, k, generator=g).to(DEVICE)
    m_args = (main.packed, main.scales, main.zeros) if with_main else (None, None, None)
    args = (x, *m_args, *at, d, *b, bias, 3, 32, factor_bits, 32)
    ref = torch.ops.sparsefx.lowrank_quant_linear(*args)
    torch.testing.assert_close(triton_lowrank_quant_linear(*args), ref, rtol=1e-5, atol=1e-4)


GEMV_CONFIGS = [None, {"BLOCK_N": 4, "BLOCK_K": 128, "SPLIT_K": 3, "num_warps": 2},   # split-K, atomics
                {"BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4}]  # block wider than a group


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gemv_kernel_matches_reference(bits, group, symmetric):
    n, k = 37, 2 * 256 + (group if group < 256 else 0)          # 37 rows: not a block multiple; k not a block multiple
    p = _packed(n, k, bits, group, symmetric, seed=bits + group)
    assert gemv_eligible(1, p)
    g = torch.Generator().manual_seed(bits * group)
    x, bias, cs = (torch.randn(1, k, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE),
                   torch.rand(n, generator=g).to(DEVICE))
    ref = quant_matmul_reference(x, p, bias, cs)
    for cfg in GEMV_CONFIGS:
        out = torch.full((1, n), float("nan"), device=DEVICE)
        torch.testing.assert_close(quant_gemv(x, p, bias, cs, config=cfg, out=out), ref, rtol=1e-5, atol=1e-4)
    # one row of eligible codes takes the GEMV kernel through quant_matmul too
    torch.testing.assert_close(quant_matmul(x, p, bias, cs), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("factor_bits", [16, 4])
def test_gemv_kernel_lowrank_epilogue(factor_bits):
    n, k, r = 53, 256, 19
    main = _packed(n, k, 4, 128, False, seed=7)
    g = torch.Generator().manual_seed(factor_bits)
    if factor_bits == 16:
        at = Packed(torch.randn(r, n, generator=g).half().to(DEVICE), None, None, 16, 1)
    else:
        at = _packed(r, 64 * 1, 4, 32, False, seed=8)              # 64 outputs: groups of 32 along n
        main = _packed(64, k, 4, 128, False, seed=7)
        n = 64
    t, x = torch.randn(1, r, generator=g).to(DEVICE), torch.randn(1, k, generator=g).to(DEVICE)
    ref = quant_matmul_reference(x, main, lowrank=(t, at))
    for cfg in GEMV_CONFIGS:
        out = torch.full((1, n), float("nan"), device=DEVICE)
        torch.testing.assert_close(quant_gemv(x, main, lowrank=(t, at), config=cfg, out=out), ref,
                                   rtol=1e-5, atol=1e-4)


def test_gemv_kernel_refuses_what_it_cannot_take():
    odd_group = _packed(8, 192, 3, 96, False, seed=0)
    assert gemv_eligible(1, _packed(8, 96, 3, 32, False, seed=0)) and not gemv_eligible(1, odd_group)
    assert not gemv_eligible(2, _packed(8, 64, 4, 32, False, seed=0))
    with pytest.raises(ValueError, match="quant_gemv takes one row"):
        quant_gemv(torch.randn(1, 192, device=DEVICE), odd_group)
    # the heuristic splits K until a large GPU has enough programs: more splits for fewer row blocks
    assert default_gemv_config(4096, 64)["SPLIT_K"] > default_gemv_config(4096, 4096)["SPLIT_K"] > 1


def test_quant_linear_op_compiles_with_inductor():
    p = _packed(24, 64, 4, 32, False, seed=5)
    x = torch.randn(2, 5, 64, device=DEVICE)
    ref = torch.ops.sparsefx.quant_linear(x, p.packed, p.scales, p.zeros, None, 4, 32)
    torch.testing.assert_close(triton_quant_linear(x, p.packed, p.scales, p.zeros, None, 4, 32), ref,
                               rtol=1e-5, atol=1e-4)
    f = torch.compile(lambda x: torch.ops.sparsefx.triton_quant_linear(x, p.packed, p.scales, p.zeros, None, 4, 32)
                      * 2, backend="inductor", fullgraph=True)
    torch.testing.assert_close(f(x), ref * 2, rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_named():
    p = _packed(8, 64, 4, 32, False, seed=0)
    with pytest.raises(ValueError, match="x has 32 columns but the weight 64"):
        quant_matmul(torch.randn(1, 32, device=DEVICE), p)
    with pytest.raises(ValueError, match="nothing to multiply"):
        quant_matmul(torch.randn(1, 64, device=DEVICE), None)
    with pytest.raises(ValueError, match="is not 4-bit codes"):
        Packed(p.packed, p.scales[:, :1], p.zeros, 4, 32)
    assert default_config(1, 4096, 11008)["BLOCK_M"] == 1 and default_config(64, 64, 64)["BLOCK_M"] == 64
