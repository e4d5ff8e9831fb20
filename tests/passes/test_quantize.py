"""The rtn / gptq passes: rewrite into sparsefx::quant_linear, lower to QuantLinear, artifacts, errors."""

import copy

import pytest
import torch

from sparsefx.artifact import load_artifact, save_artifact
from sparsefx.ops.quant.eager import QuantLinear
from sparsefx.errors import CalibrationError, RecipeError
from sparsefx import ops  # noqa: F401
from sparsefx.models import TINY_ARCHS, tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress


def _calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


CASES = [(arch, m, 4, False) for arch in TINY_ARCHS for m in ("rtn", "gptq")] + \
        [("llama", m, b, s) for m in ("rtn", "gptq") for b, s in ((2, False), (3, True), (8, True))]


@pytest.mark.parametrize("arch, method, bits, symmetric", CASES)
def test_quantized_model_computes_with_its_dequantized_weights(arch, method, bits, symmetric, tokens):
    model = tiny_model(arch)
    recipe = Recipe.from_yaml(f"passes: [{{method: {method}, bits: {bits}, group_size: 32, "
                              f"symmetric: {str(symmetric).lower()}}}]")
    result = compress(model, recipe, calibration=_calib(), progress=False)
    ql = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(ql) == 7 * model.config.num_hidden_layers
    ops_in_ir = [n for n in result.graph_module.graph.nodes if n.target == torch.ops.sparsefx.quant_linear.default]
    assert len(ops_in_ir) == len(ql)
    # reference: an unquantized copy of the architecture carrying the dequantized weights
    ref = tiny_model(arch)
    with torch.no_grad():
        for name, m in ql.items():
            ref.get_submodule(name).weight.copy_(m.qweight.dequantize())
        out = model(tokens).logits
        torch.testing.assert_close(out, ref(tokens).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.graph_module(tokens), out, rtol=0, atol=0)
    details = result.reports[-1].details
    assert details["bits_per_weight"] == pytest.approx(bits + (16 + (0 if symmetric else 8)) / 32)


def test_gptq_is_closer_to_dense_than_rtn_at_3_bits(tokens):
    dense = tiny_model("llama")
    err = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(dense)
        compress(model, Recipe.from_yaml(f"passes: [{{method: {method}, bits: 3, group_size: 32}}]"),
                 calibration=_calib(), progress=False)
        with torch.no_grad():
            err[method] = (model(_calib()).logits - dense(_calib()).logits).pow(2).mean()
    assert err["gptq"] < err["rtn"]


def test_artifact_round_trip_is_exact_and_smaller(tmp_path, tokens):
    model = tiny_model("qwen2")
    recipe = Recipe.from_yaml("passes: [{method: gptq, bits: 4, group_size: 32, roles: [q, k, v, o, gate, up, "
                              "down, lm_head]}]")
    result = compress(model, recipe, calibration=_calib(), progress=False)
    dense_out = save_artifact(tmp_path / "dense", tiny_model("qwen2"), None, recipe, {})
    out = save_artifact(tmp_path / "q", model, None, recipe, result.report_dict())
    art = load_artifact(out)
    with torch.no_grad():
        assert torch.equal(art.model(tokens).logits, model(tokens).logits)
    assert isinstance(art.model.lm_head, QuantLinear)
    size = {d: sum(f.stat().st_size for f in p.glob("*.safetensors")) for d, p in (("dense", dense_out), ("q", out))}
    assert size["q"] < 0.5 * size["dense"]
    assert art.model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_errors():
    with pytest.raises(CalibrationError, match="gptq needs calibration"):
        compress(tiny_model("llama"), Recipe.from_yaml("passes: [{method: gptq, group_size: 32}]"),
                 progress=False)
    with pytest.raises(RecipeError, match="multiple of group_size 64"):   # tiny MLP width 96
        compress(tiny_model("llama"), Recipe.from_yaml("passes: [{method: rtn, group_size: 64}]"), progress=False)
    with pytest.raises(RecipeError, match="rtn.bits"):
        Recipe.from_yaml("passes: [{method: rtn, bits: 5}]")
    with pytest.raises(RecipeError, match="gptq.damp"):
        Recipe.from_yaml("passes: [{method: gptq, damp: 20}]")


def test_gram_observer_weighs_the_sink_position_for_value_projections():
    from sparsefx.passes.quantize import GramObserver

    obs = GramObserver(5)
    x = torch.randn(3, 7, 5)                                  # [B, S, C]
    assert torch.equal(obs(x), x)
    g = obs.stats()
    flat, first = x.reshape(-1, 5).double(), x[:, 0].double()
    tol = dict(rtol=1e-5, atol=1e-5)   # the observer multiplies in fp32 and accumulates in fp64
    torch.testing.assert_close(g.gram, flat.T @ flat, **tol)
    torch.testing.assert_close(g.for_role("v"), flat.T @ flat + 6 * first.T @ first, **tol)
    torch.testing.assert_close(g.for_role("q"), g.gram)
    torch.testing.assert_close(g.for_role("v", v_sink=False), g.gram)
