"""Low-rank + quantization passes (svd, q_then_l, l_then_q, dam): budgets, the fused op, the adhesive, artifacts."""

import copy

import pytest
import torch

from sparsefx.artifact import load_artifact, save_artifact
from sparsefx.ops.quant.eager import LowRankQuantLinear
from sparsefx.errors import RecipeError
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.passes.dam import DamConfig, LThenQConfig, QThenLConfig, SvdConfig, decompose
from sparsefx.pipeline import compress

RECIPES = {
    "svd": "{method: svd, budget: 4.0}",
    "q_then_l": "{method: q_then_l, budget: 4.0, bits: 2, group_size: 32}",
    "l_then_q": "{method: l_then_q, budget: 4.0, bits: 2, group_size: 32}",
    "dam": "{method: dam, budget: 4.0, bits: 2, group_size: 32, factor_group: 32}",
}


def _calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))


def _layer_data(seed=0, out_f=96, in_f=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.4 + 0.3 * torch.randn(
        2048, in_f, generator=g)
    return x, torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("method", list(RECIPES))
def test_each_linear_fits_its_budget_and_the_model_runs_its_decomposition(method, tokens, tmp_path):
    model = tiny_model("qwen2")
    recipe = Recipe.from_yaml(f"passes: [{RECIPES[method]}]")
    result = compress(model, recipe, calibration=_calib(), progress=False)
    cfg = recipe.passes[0]
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LowRankQuantLinear)}
    assert len(mods) == 7 * model.config.num_hidden_layers
    details = result.reports[-1].details
    for param, info in details["per_param"].items():
        assert info["bits_per_weight"] <= cfg.budget
        out_f, in_f = model.get_submodule(param.rsplit(".", 1)[0]).out_features, \
            model.get_submodule(param.rsplit(".", 1)[0]).in_features
        assert info["rank"] == min(cfg.rank_for(out_f, in_f), out_f, in_f)
    # the eager modules compute what the graph computes; a reference model carrying each linear's effective weight
    # (read off the op with an identity input) computes the same logits
    ref = tiny_model("qwen2")
    with torch.no_grad():
        for name, m in mods.items():
            eye = torch.eye(m.in_features)
            w_eff = (m(eye) - (0 if m.bias is None else m.bias)).T
            ref.get_submodule(name).weight.copy_(w_eff)
        out = model(tokens).logits
        torch.testing.assert_close(out, ref(tokens).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.graph_module(tokens), out, rtol=0, atol=0)
    # round trip through an artifact is exact
    art = load_artifact(save_artifact(tmp_path / method, model, None, recipe, result.report_dict()))
    with torch.no_grad():
        assert torch.equal(art.model(tokens).logits, out)


def test_adhesive_and_whitening_lower_the_layer_output_error():
    x, w = _layer_data()
    h = x.T @ x

    def err(cfg, rank):
        return (x @ (decompose(cfg, w, h, rank).dense() - w).T).pow(2).mean()

    base = dict(budget=8.0, bits=2, group_size=32, factor_group=32)
    for factor_bits in (2, 3, 4):    # the fitted diagonal is least squares given Q: never worse than d = 1
        cfg = dict(base, factor_bits=factor_bits)
        assert err(DamConfig(**cfg), 24) <= err(DamConfig(**cfg, adhesive=False), 24) * (1 + 1e-6)
    # coarse factors lose most to quantization: there the adhesive wins clearly
    assert err(DamConfig(**base, factor_bits=2), 24) < 0.95 * err(DamConfig(**base, factor_bits=2, adhesive=False), 24)
    assert err(SvdConfig(budget=8.0), 16) < err(SvdConfig(budget=8.0, whiten=False), 16)
    # with the same main weight bits, a low-rank correction helps either way round
    gptq_only = err(LThenQConfig(**base), 1)
    assert err(QThenLConfig(**base), 16) < gptq_only and err(LThenQConfig(**base), 16) < gptq_only


def test_dam_spends_the_budget_on_factors_when_that_loses_least():
    # an exactly rank-12 weight: 4-bit factors at full rank 12 cost about 3.7 bits per weight here and lose only their
    # rounding; a 2-bit main weight plus rank 5 loses far more. With the whole budget in factors DAM must take them
    x, _ = _layer_data(seed=5)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(96, 12, generator=g) @ torch.randn(12, 64, generator=g)
    h = x.T @ x
    cfg = DamConfig(budget=4.0, bits=2, group_size=32, factor_group=32)
    rank = min(cfg.rank_for(96, 64), 96, 64)
    dec = decompose(cfg, w, h, rank)
    assert dec.order == "factors_only" and dec.main is None and dec.rank > rank
    assert dec.nbytes * 8 <= cfg.budget * w.numel()                       # still within the budget
    rel = float((x @ (dec.dense() - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert rel < 0.02                                                      # 4-bit factor rounding only
    # where a main weight pays (a full-rank weight), a main-weight order is kept
    assert decompose(cfg, torch.randn(96, 64, generator=g), h, rank).main is not None


def test_budget_errors_name_the_linear_and_the_need():
    with pytest.raises(RecipeError, match=r"q_then_l.budget 3.0 leaves no room .*q_proj"):
        compress(tiny_model("llama"), Recipe.from_yaml("passes: [{method: q_then_l, budget: 3.0, bits: 2, "
                                                       "group_size: 32}]"), calibration=_calib(), progress=False)
    with pytest.raises(RecipeError, match="dam.factor_bits"):
        Recipe.from_yaml("passes: [{method: dam, factor_bits: 5}]")
    with pytest.raises(RecipeError, match="svd.budget"):
        Recipe.from_yaml("passes: [{method: svd, budget: 0}]")


@pytest.mark.parametrize("method", ["svd", "q_then_l", "l_then_q", "dam"])
def test_stored_factors_stay_finite_and_accurate_when_the_gram_is_large(method):
    # A Gram summed over many tokens with large activations (SmolLM2: singular values of W S beyond fp16's 65504)
    # must not overflow the fp16 factors or d: the first L->Q run on SmolLM2 gave NaN perplexity this way.
    x, w = _layer_data(seed=3)
    h = x.T @ x
    cls = {"svd": SvdConfig, "q_then_l": QThenLConfig, "l_then_q": LThenQConfig, "dam": DamConfig}[method]
    cfg = cls(budget=8.0, bits=2, group_size=32, factor_group=32)

    def rel_err(scale):
        dec = decompose(cfg, w, h * scale, 16)
        dense = dec.dense()
        assert torch.isfinite(dense).all() and torch.isfinite(dec.d.float()).all()
        return float((x @ (dense - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())

    small, big = rel_err(1.0), rel_err(1e8)
    # scaling H scales every error term alike: the decomposition (and its error) must not change beyond fp16 noise
    assert big == pytest.approx(small, rel=0.02)
