"""prepare_cpu_decode: compressed linears re-stored for the CPU kernel; outputs unchanged up to summation order."""

import pytest
import torch

from sparsefx.codegen.cpu import enable_cpu_kernels, prepare_cpu_decode
from sparsefx.codegen.cpu.sparse_gemv import cpu_supports_kernel
from sparsefx.codegen.eager import TieredLinear
from sparsefx.ir.ops import tiered_linear_math, tiered_linear_reference
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

needs_kernel = pytest.mark.skipif(not cpu_supports_kernel(), reason="the C++ kernel needs AVX2/FMA/F16C")


def _compressed(recipe="{method: daws, sparsity: 0.5}"):
    model = tiny_model("llama")
    compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), calibration=torch.randint(0, 256, (8, 32)),
             progress=False)
    return model


@needs_kernel
@pytest.mark.parametrize("recipe", ["{method: daws, sparsity: 0.5}",
                                    "{method: daws, sparsity: 0.6, medium_fraction: 0}"])
def test_prepared_model_decodes_through_the_kernel_with_the_same_outputs(recipe):
    model = _compressed(recipe)
    prompt = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(prompt, use_cache=True)
        ref_next = model(prompt[:, -1:] * 0 + 5, past_key_values=ref.past_key_values, use_cache=True).logits
    assert prepare_cpu_decode(model) == 7 * model.config.num_hidden_layers
    calls = []
    for m in model.modules():
        if isinstance(m, TieredLinear):
            kernel = m.decode_kernel
            m.decode_kernel = lambda *a, k=kernel: calls.append(1) or k(*a)
    with torch.no_grad():
        out = model(prompt, use_cache=True)  # prefill: 7 tokens, not the kernel
        assert not calls
        nxt = model(prompt[:, -1:] * 0 + 5, past_key_values=out.past_key_values, use_cache=True).logits
    assert len(calls) == 7 * model.config.num_hidden_layers  # every compressed linear of the decode step
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref_next, rtol=1e-4, atol=1e-4)
    gen = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 12)


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(97, 61), (576, 1536), (1536, 577)])
def test_registered_cpu_kernel_of_the_op_on_transposed_storage(in_f, out_f):
    enable_cpu_kernels()
    w = torch.randn(in_f, out_f).t()         # [out, in] viewed over a contiguous [in, out]
    wm = torch.randn(in_f, out_f).t()
    b = torch.randn(out_f)
    x = torch.randn(1, 1, in_f)
    a = x.abs().flatten()
    t_high, t_low = float(a.quantile(0.7)), float(a.quantile(0.3))
    got = torch.ops.sparsefx.tiered_linear(x, w, wm, b, t_high, t_low)
    torch.testing.assert_close(got, tiered_linear_reference(x, w, wm, b, t_high, t_low), rtol=1e-4, atol=1e-4)
    # zero thresholds never leave the default (dense GEMM) implementation
    assert torch.equal(torch.ops.sparsefx.tiered_linear(x, w, wm, b, 0.0, 0.0),
                       tiered_linear_math(x, w, wm, b, 0.0, 0.0))


def test_prepare_without_compressed_linears_changes_nothing():
    model = tiny_model("llama")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert prepare_cpu_decode(model) == 0
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
