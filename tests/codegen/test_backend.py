"""The torch.compile backend "sparsefx": lowering counts, outputs equal to eager, binding an artifact, generate()."""

import copy
import logging

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from sparsefx.artifact import load_artifact, save_artifact
from sparsefx.codegen import backend
from sparsefx.errors import ArtifactError, RecipeError
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

DAWS = "passes: [{method: daws, sparsity: 0.5}]"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # each test compiles anew and counts what the lowering pass saw (a cache hit would skip the pass)
    torch._dynamo.reset()
    backend.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def _compressed(arch, recipe_yaml):
    model = tiny_model(arch)
    recipe = Recipe.from_yaml(recipe_yaml)
    result = compress(model, recipe, calibration=torch.randint(0, 256, (8, 32)), progress=False)
    return model.eval(), recipe, result


def test_registered_as_an_entry_point():
    assert "sparsefx" in torch._dynamo.list_backends()


@pytest.mark.parametrize("kernels, expect", [("auto", "cpu.tiered_linear"), ("triton", "triton.tiered_linear")])
def test_daws_model_compiles_to_kernels_and_matches_eager(kernels, expect, tokens):
    pytest.importorskip("triton") if kernels == "triton" else None
    model, _, _ = _compressed("llama", DAWS)
    with torch.no_grad():
        ref = model(tokens).logits
        out = torch.compile(model, backend="sparsefx", options={"kernels": kernels})(tokens).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert backend.counters[expect] == 7 * model.config.num_hidden_layers
    assert backend.counters["fallback"] == 0


@pytest.mark.parametrize("recipe, op", [("passes: [{method: rtn, bits: 4, group_size: 32}]", "quant_linear"),
                                        ("passes: [{method: dam, budget: 5.0, bits: 3, group_size: 32, "
                                         "factor_group: 32}]", "lowrank_quant_linear"),
                                        ("passes: [{method: magnitude, pattern: '2:4', pack: true}]", "nm_linear"),
                                        ("passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                                         "layout: banded}]", "banded_linear"),
                                        ("passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                                         "medium_dtype: float16}]", "multitier_linear")])
def test_compressed_linears_lower_to_their_triton_kernels(recipe, op, tokens):
    pytest.importorskip("triton")
    model, _, _ = _compressed("qwen2", recipe)
    compiled = torch.compile(model, backend="sparsefx", options={"kernels": "triton", "inductor": False})
    with torch.no_grad():
        ref = model(tokens).logits
        out = compiled(tokens).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        # one token: the decode kernels themselves
        torch.testing.assert_close(compiled(tokens[:1, :1]).logits, model(tokens[:1, :1]).logits, rtol=1e-4, atol=1e-4)
    assert backend.counters[f"triton.{op}"] >= 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("recipe, op", [("passes: [{method: rtn, bits: 3, group_size: 32}]", "quant_linear"),
                                        ("passes: [{method: dam, budget: 5.0, bits: 3, group_size: 32, "
                                         "factor_group: 32}]", "lowrank_quant_linear")])
def test_quantized_models_lower_to_the_cpu_kernels(recipe, op, tokens, monkeypatch):
    from sparsefx.ops.quant import cpu as quant_gemv

    model, _, _ = _compressed("llama", recipe)
    one = tokens[:1, :1]                                     # one token: the packed-code kernel, not dequant + GEMM
    calls = []
    for name in ("quant_matmul", "lowrank_quant_matmul"):
        real = getattr(quant_gemv, name)
        monkeypatch.setattr(quant_gemv, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    with torch.no_grad():
        ref = model(one).logits
        calls.clear()                                        # only the compiled model's calls count
        out = torch.compile(model, backend="sparsefx", options={"kernels": "cpu"})(one).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # retargeted to the C++-registered op: the compiled graph calls the kernel without going through Python
    assert backend.counters[f"cpu.{op}"] == 7 * model.config.num_hidden_layers and not calls
    assert backend.counters[f"reference.{op}"] == 0 and backend.counters["fallback"] == 0


@pytest.mark.parametrize("entry, kind, op", [
    ("{method: rtn, bits: 4, group_size: 32}", "QuantLinear", "quant_linear"),
    ("{method: dam, budget: 5.0, bits: 3, group_size: 32, factor_group: 32}", "LowRankQuantLinear",
     "lowrank_quant_linear")])
def test_int8_activations_option_lowers_quantized_linears_to_the_q8_ops(tokens, entry, kind, op):
    from sparsefx.ops.quant.cpu import round_activations_int8

    model, _, _ = _compressed("llama", f"passes: [{entry}]")
    one = tokens[:1, :1]
    with torch.no_grad():
        ref = model(one).logits
        compiled = torch.compile(model, backend="sparsefx", options={"kernels": "cpu", "int8_activations": True})
        out = compiled(one).logits
    n = 7 * model.config.num_hidden_layers
    assert backend.counters[f"cpu.{op}_q8"] == n and backend.counters[f"cpu.{op}"] == 0
    assert backend.counters["fallback"] == 0
    # what the q8 op computes: each linear's input rounded to int8 per 32 channels (DAM: packed factors too)
    handles = [m.register_forward_pre_hook(lambda _m, a: (round_activations_int8(a[0]),))
               for m in model.modules() if type(m).__name__ == kind]
    with torch.no_grad():
        rounded = model(one).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, rounded, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_binding_an_artifact_to_a_dense_model(tmp_path, tokens):
    model, recipe, result = _compressed("qwen2", DAWS)
    dense = tiny_model("qwen2").eval()                       # same seed: the weights the artifact started from
    art = save_artifact(tmp_path / "daws", model, None, recipe, result.report_dict())
    with torch.no_grad():
        ref = model(tokens).logits
        dense_out = dense(tokens).logits
        out = torch.compile(dense, backend="sparsefx", options={"artifact": str(art)})(tokens).logits
    assert backend.counters["bound"] == 7 * model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, dense_out, atol=1e-3)     # the plan really applied
    # the dense model itself is untouched
    torch.testing.assert_close(dense(tokens).logits, dense_out, rtol=0, atol=0)


def test_generate_with_kv_cache_under_the_backend(tmp_path):
    model, recipe, result = _compressed("mistral", DAWS)
    loaded = load_artifact(save_artifact(tmp_path / "a", model, None, recipe, result.report_dict())).model.eval()
    prompt = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        eager = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
        loaded.forward = torch.compile(loaded.forward, backend="sparsefx")
        compiled = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled, eager)
    assert backend.counters["cpu.tiered_linear"] >= 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("layout, op", [("separate", "multitier_linear"), ("banded", "banded_linear")])
def test_multitier_generate_with_kv_cache_under_the_backend(layout, op):
    model, _, _ = _compressed("llama", "passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                                       f"layout: {layout}}}]")
    prompt = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=6, do_sample=False)
        ref = model(prompt).logits
        model.forward = torch.compile(model.forward, backend="sparsefx")
        torch.testing.assert_close(model(prompt).logits, ref, rtol=1e-4, atol=1e-4)
        compiled = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled, eager)
    assert backend.counters[f"cpu.{op}"] >= 7 * model.config.num_hidden_layers
    assert hasattr(torch.ops.sparsefx_cpu, op) and backend.counters["fallback"] == 0


@pytest.mark.parametrize("layout, op", [("separate", "multitier_linear"), ("banded", "banded_linear")])
def test_a_prepared_model_compiled_reaches_the_cpu_decode_kernels(layout, op):
    """The counters above count lowering; this counts the C++ op's calls at run time (torch.profiler sees every
    dispatcher call) and checks their one-token inputs meet the prepared layout the kernels' fast path reads."""
    from torch.profiler import ProfilerActivity, profile

    from sparsefx.codegen.cpu import prepare_cpu_decode
    from sparsefx.ops.routed.cpu import extension_runs
    from sparsefx.ops.routed.eager import BandedLinear, MultiTierLinear

    assert extension_runs(), "the C++ kernels must build on the CPU machines the tests run on (AVX2, a compiler)"
    model, _, _ = _compressed("llama", "passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                                       f"layout: {layout}}}]")
    layers = model.config.num_hidden_layers
    assert prepare_cpu_decode(model) == 7 * layers
    routed = [m for m in model.modules() if isinstance(m, (BandedLinear, MultiTierLinear))]
    stored = [m.weight_banded if layout == "banded" else m.weight for m in routed]
    assert len(routed) == 7 * layers and all(w.stride(0) == 1 for w in stored)    # [out, in] viewed over [in, out]
    prompt = torch.randint(0, 256, (1, 6))
    backend.counters.clear()
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, backend="sparsefx")
        model.generate(prompt, max_new_tokens=4, do_sample=False)     # compile first: prompt, 1 token, dynamic length
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            compiled = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled, eager) and backend.counters["fallback"] == 0
    calls = [e for e in prof.events() if e.name == f"sparsefx_cpu::{op}"]
    one_token = [e for e in calls if e.input_shapes and e.input_shapes[0][:-1] in ([1, 1], [1])]
    assert len(one_token) == 7 * layers * 5                 # every linear of the 5 one-token steps, in C++
    assert len(calls) == len(one_token) + 7 * layers        # and the prompt's forward
    # nothing ran the Python-registered op (while compiling, Dynamo's fake-tensor tracing calls it: not here)
    assert not [e for e in prof.events() if e.name == f"sparsefx::{op}"]


def test_a_failing_lowering_falls_back_to_eager_with_a_warning(monkeypatch, caplog, tokens):
    model, _, _ = _compressed("llama", DAWS)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(backend, "_compile", broken)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sparsefx.codegen.backend"):
        ref = model(tokens).logits
        out = torch.compile(model, backend="sparsefx")(tokens).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert backend.counters["fallback"] == 1 and "no kernel today" in caplog.text


def test_bad_options_and_artifacts_are_named(tmp_path, tokens):
    model = tiny_model("llama").eval()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(model, backend="sparsefx", options={"kernel": "cpu"})(tokens)
    with pytest.raises(RecipeError, match="kernels must be one of"):
        backend.BackendOptions.from_dict({"kernels": "cuda"})
    with pytest.raises(RecipeError, match="int8_activations must be true or false"):
        backend.BackendOptions.from_dict({"int8_activations": "yes"})
    masked, recipe, result = _compressed("llama", "passes: [{method: magnitude, sparsity: 0.5}]")
    art = save_artifact(tmp_path / "mag", masked, None, recipe, result.report_dict())
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no compressed.json"):
        torch.compile(copy.deepcopy(model), backend="sparsefx", options={"artifact": str(art)})(tokens)
    with pytest.raises(ArtifactError, match="no compressed.json"):
        backend._ArtifactPlan(art)
