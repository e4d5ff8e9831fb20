"""prepare_cpu_decode: compressed linears re-stored for the CPU kernel; outputs unchanged up to summation order."""

import pytest
import torch

from sparsefx.codegen.cpu import enable_cpu_kernels, prepare_cpu_decode
from sparsefx.ops.routed.cpu import cpu_supports_kernels
from sparsefx.ops.routed.eager import BandedLinear, MultiTierLinear, TieredLinear
from sparsefx.ops.routed.op import tiered_linear_math, tiered_linear_reference
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

needs_kernel = pytest.mark.skipif(not cpu_supports_kernels(), reason="the C++ kernel needs AVX2/FMA/F16C")


def _compressed(recipe="{method: daws, sparsity: 0.5}"):
    model = tiny_model("llama")
    compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), calibration=torch.randint(0, 256, (8, 32)),
             progress=False)
    return model


@needs_kernel
@pytest.mark.parametrize("recipe, pack", [("{method: daws, sparsity: 0.5}", False),
                                          ("{method: daws, sparsity: 0.5}", True),
                                          ("{method: daws, sparsity: 0.5, medium_dtype: float16}", True),
                                          ("{method: daws, sparsity: 0.6, medium_fraction: 0}", True),
                                          ("{method: daws, sparsity: 0.5, medium_tiers: [0.3, 0.6, 0.8]}", False),
                                          ("{method: daws, sparsity: 0.5, medium_tiers: [0.3, 0.6], "
                                           "medium_dtype: float16}", False),
                                          ("{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                                           "layout: banded}", False)])
def test_prepared_model_decodes_through_the_kernel_with_the_same_outputs(recipe, pack):
    model = _compressed(recipe)
    prompt = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(prompt, use_cache=True)
        ref_next = model(prompt[:, -1:] * 0 + 5, past_key_values=ref.past_key_values, use_cache=True).logits
    assert prepare_cpu_decode(model, pack_medium=pack) == 7 * model.config.num_hidden_layers
    tiered = [m for m in model.modules() if isinstance(m, TieredLinear)]
    # packed only where asked and where there is a pruned medium tier of its own (none under TEAL)
    assert all((m.medium_packed is not None) == (pack and m.has_medium_weights) for m in tiered)
    calls = []
    for m in model.modules():
        if isinstance(m, (TieredLinear, MultiTierLinear, BandedLinear)):
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


def test_prepare_without_compressed_linears_changes_nothing_unless_asked_for_dense_linears():
    model = tiny_model("llama")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert prepare_cpu_decode(model, dense_linears=False) == 0
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_dense_linears_are_restored_transposed_with_ties_kept(tied):
    model = tiny_model("llama")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref = model(prompt, use_cache=True)
        ref_next = model(prompt[:, -1:], past_key_values=ref.past_key_values, use_cache=True).logits
    assert prepare_cpu_decode(model) == 0          # the count is of compressed linears
    for name, w in linears.items():
        weight = model.get_submodule(name).weight
        assert weight.t().is_contiguous() and not weight.is_contiguous(), name
        assert torch.equal(weight, w), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert sum(p.numel() for p in model.parameters()) == n_params  # a tie stays one tensor
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        nxt = model(prompt[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref_next, rtol=1e-5, atol=1e-5)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    prepare_cpu_decode(model)                      # a second preparation re-stores nothing
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}


@needs_kernel
def test_packed_model_compiles_to_the_packed_op_with_eager_outputs():
    model = _compressed("{method: daws, sparsity: 0.5}")
    prepare_cpu_decode(model, pack_medium=True)
    layer = next(m for m in model.modules() if isinstance(m, TieredLinear))
    x1, x5 = torch.randn(1, 1, layer.in_features), torch.randn(2, 5, layer.in_features)
    compiled = torch.compile(layer, backend="sparsefx")
    with torch.no_grad():
        ref1, ref5 = (tiered_linear_reference(x, layer.weight, layer.weight_medium, layer.bias, layer.t_high,
                                              layer.t_low) for x in (x1, x5))
        for x, ref in ((x1, ref1), (x5, ref5)):
            torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
    # the module's graph calls the C++ packed op, with the packed buffers as inputs
    gm, _ = torch._dynamo.export(layer)(x1)
    packed_op = torch.ops.sparsefx_cpu.tiered_linear_packed
    assert any(n.target in (packed_op, packed_op.default) for n in gm.graph.nodes), gm.graph


@needs_kernel
@pytest.mark.parametrize("prepare", [True, False])
def test_evaluate_times_decode_through_the_cpu_kernels_unless_told_not_to(prepare):
    from sparsefx.eval import evaluate

    model = _compressed()
    res = evaluate(model, None, progress=False, windows=torch.randint(0, 256, (2, 33)), prepare_decode=prepare)
    assert res.decode_tok_s > 0
    tiered = [m for m in model.modules() if isinstance(m, TieredLinear)]
    assert len(tiered) == 7 * model.config.num_hidden_layers
    assert all((m.decode_kernel is not None) == prepare for m in tiered)
    assert model.lm_head.weight.t().is_contiguous() == prepare      # the dense LM head re-stored too


@needs_kernel
@pytest.mark.parametrize("recipe", ["{method: rtn, bits: 4, group_size: 32}", "{method: daws, sparsity: 0.5}"])
def test_decode_path_perplexity_runs_the_decode_kernels_and_matches_prefill(recipe):
    from sparsefx.eval import evaluate, perplexity

    model = _compressed(recipe)
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    prefill = perplexity(model, windows, progress=False)
    prepare_cpu_decode(model)
    calls = []
    for m in model.modules():
        if getattr(m, "decode_kernel", None) is not None:
            kernel = m.decode_kernel
            m.decode_kernel = lambda *a, k=kernel: calls.append(1) or k(*a)
    res = evaluate(model, None, speed=False, progress=False, windows=windows, prepare_decode=False,
                   decode_path=True)
    # one call per compressed linear per token fed: every position of every window
    assert len(calls) == 7 * model.config.num_hidden_layers * windows.numel()
    assert res.tokens == prefill[2] == windows.shape[0] * (windows.shape[1] - 1)
    assert res.ppl == pytest.approx(prefill[0], rel=1e-4)
