"""GISP and the structured baselines on tiny GQA models: scores, schedule, guard, physical removal, nesting."""

import copy
import logging

import pytest
import torch

from sparsefx.errors import CalibrationError, RecipeError
from sparsefx.ir import annotate, capture, verify
from sparsefx.ir.capture import get_param
from sparsefx.models import tiny_model
from sparsefx.passes.base import AnnotatePass, PassContext, PassManager
from sparsefx.passes.config import Recipe
from sparsefx.passes.gisp import GispConfig, GispPass, objective_gradients
from sparsefx.passes.structured import PLAN, shrink_model, unit_scores, zero_units
from sparsefx.pipeline import compress

GQA_ARCHS = ["llama", "mistral", "qwen2"]


def _calib(n=8, s=24, seed=0):
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


def _plan(model, recipe_pass: str, calib=None, pairs=None):
    """Run annotate + the structured pass on a capture of ``model``; return (gm, plan) without lowering."""
    from sparsefx.passes.config import build_pass, config_from_dict
    import yaml

    p = build_pass(config_from_dict(yaml.safe_load(recipe_pass)))
    passes = [AnnotatePass()]
    if "calibrated" in p.requires:
        from sparsefx.passes.calibrate import CalibratePass
        passes.append(CalibratePass())
    gm, _ = PassManager(passes + [p]).run(capture(model), PassContext(calibration=calib, progress=False,
                                                                      pairs=pairs))
    return gm, gm.meta[PLAN]


def _masked_reference(model, plan, level):
    """A copy of the dense model with the units removed at ``level`` zeroed (what removal must compute)."""
    ref = copy.deepcopy(model)
    gm = capture(ref)
    annotate(gm)
    n = plan.removed(level)
    for i, group in enumerate(plan.groups):
        units = torch.tensor([u for g, u, _ in plan.order[:n] if g == i], dtype=torch.long)
        if len(units):
            zero_units(gm, group, units)
    return ref


def test_unit_scores_sum_rows_columns_and_biases():
    from sparsefx.ir.depgraph import Group

    g = Group("attention", 0, 2, (("q.weight", 0, 2), ("q.bias", 0, 2), ("o.weight", 1, 2)))
    q = torch.arange(12.0).reshape(4, 3)       # units own rows {0,1} and {2,3}
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    o = torch.ones(5, 4)                       # units own columns {0,1} and {2,3}
    got = unit_scores(g, {"q.weight": q, "q.bias": b, "o.weight": o})
    assert got.tolist() == [q[:2].sum() + 3 + 10, q[2:].sum() + 7 + 10]


@pytest.mark.parametrize("arch", GQA_ARCHS)
def test_gisp_removes_physically_and_matches_masked_model(arch):
    model = tiny_model(arch, layers=3)
    dense = copy.deepcopy(model)
    n_dense = sum(p.numel() for p in model.parameters())
    result = compress(model, Recipe.from_yaml("passes: [{method: gisp, sparsity: 0.4, steps: 2}]"),
                      calibration=_calib(), progress=False)
    plan = model.sparsefx_structure
    assert plan.level_of(plan.applied) >= 0.4
    removed = n_dense - sum(p.numel() for p in model.parameters())
    assert removed == sum(plan.unit_params[g] for g, _, _ in plan.order[:plan.applied])
    # the compressed model computes exactly what the dense model with those units zeroed computes
    tokens = torch.randint(0, 256, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, _masked_reference(dense, plan, 0.4)(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    # it was captured again with its new shapes, and the IR verifies
    gm = result.graph_module
    verify(gm)
    for i, group in enumerate(plan.groups):
        kept = len(plan.kept_units(plan.applied)[i])
        for param, axis, block in group.members:
            assert get_param(gm, param).shape[axis] == kept * block
    # generate() with the KV cache agrees with recomputing the whole prefix each step
    prompt = torch.randint(0, 256, (1, 6))
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_levels_are_nested_and_incremental_shrinking_equals_direct():
    model = tiny_model("llama", layers=3)
    gm, plan = _plan(model, "{method: gisp, sparsity: 0.5, steps: 3, level: 0.0}", _calib())
    for a, b in [(0.1, 0.2), (0.2, 0.35), (0.35, 0.5)]:
        for ka, kb in zip(plan.kept_units(plan.removed(a)), plan.kept_units(plan.removed(b))):
            assert set(kb.tolist()) <= set(ka.tolist())
    step_by_step, direct = copy.deepcopy(model), copy.deepcopy(model)
    p1, p2 = copy.deepcopy(plan), copy.deepcopy(plan)
    for level in (0.1, 0.3, 0.5):
        shrink_model(step_by_step, p1, level)
    shrink_model(direct, p2, 0.5)
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(step_by_step(tokens).logits, direct(tokens).logits)
    with pytest.raises(ValueError, match="cannot come back"):
        shrink_model(direct, p2, 0.2)


def test_search_restores_weights_and_grad_flags():
    model = tiny_model("qwen2", layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    _plan(model, "{method: gisp, sparsity: 0.5, steps: 3, level: 0.0}", _calib())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n] and p.grad is None


def test_one_shot_order_is_the_normalised_taylor_ranking_and_iteration_agrees_on_its_first_step(caplog):
    model = tiny_model("llama", layers=3)
    calib = _calib()
    gm, plan = _plan(model, "{method: gisp, sparsity: 0.4, steps: 1, level: 0.0}", calib)
    # recompute the scores independently: |w * dL/dw| summed per unit, divided by the unit's parameters
    params = sorted({m[0] for g in plan.groups for m in g.members})
    grads, _ = objective_gradients(gm, params, PassContext(calibration=calib, progress=False))
    ew = {p: (get_param(gm, p) * grads[p]).abs().detach() for p in params}
    score = {(i, u): float(s) / plan.unit_params[i] for i, g in enumerate(plan.groups)
             for u, s in enumerate(unit_scores(g, ew))}
    first = plan.removed(plan.exact_until)
    got = [score[(g, u)] for g, u, _ in plan.order[:first]]
    assert got == sorted(got)
    # nothing that stayed (and could go) scored lower than the last unit removed
    gone = {(g, u) for g, u, _ in plan.order[:first]}
    left = [s for k, s in score.items() if k not in gone and k in {(g, u) for g, u, _ in plan.order}]
    assert min(left) >= max(got) - 1e-12
    # iterative: the first of two steps removes the one-shot ranking's prefix up to half the target
    with caplog.at_level(logging.INFO, logger="sparsefx.passes.gisp"):
        _, plan2 = _plan(tiny_model("llama", layers=3), "{method: gisp, sparsity: 0.4, steps: 2, level: 0.0}", calib)
    n1 = plan2.steps[0]["units_removed"]
    assert [(g, u) for g, u, _ in plan2.order[:n1]] == [(g, u) for g, u, _ in plan.order[:n1]]
    assert len(plan2.steps) == 2 and plan2.steps[1]["loss_before"] != plan2.steps[0]["loss_before"]
    # one line per round (minutes each on a real model; piped, there are no bars)
    said = [r.getMessage() for r in caplog.records if r.name == "sparsefx.passes.gisp"]
    assert [m.split(":")[0] for m in said] == ["gisp round 1/2", "gisp round 2/2"]
    assert f"{plan2.steps[0]['units_removed']} units removed" in said[0]


def test_guard_keeps_a_unit_in_every_group():
    model = tiny_model("mistral", layers=2)   # 1 KV head: attention groups have a single unit
    _, plan = _plan(model, "{method: gisp, sparsity: 0.9, steps: 2, level: 0.0}", _calib())
    kept = plan.kept_units(len(plan.order))
    assert all(len(k) >= 1 for k in kept)
    assert all(plan.groups[g].kind == "mlp" for g, _, _ in plan.order)
    _, plan = _plan(tiny_model("llama", layers=2), "{method: structured_magnitude, sparsity: 0.9, min_units: 3}")
    kept = plan.kept_units(len(plan.order))
    assert all(len(k) >= min(3, g.n_units) for k, g in zip(kept, plan.groups))
    assert all(len(k) == 3 for k, g in zip(kept, plan.groups) if g.kind == "mlp")


def test_kinds_restrict_what_is_removed():
    _, plan = _plan(tiny_model("llama", layers=2), "{method: gisp, sparsity: 0.3, kinds: [attention]}", _calib())
    assert plan.order and all(plan.groups[g].kind == "attention" for g, _, _ in plan.order)


@pytest.mark.parametrize("method", ["structured_magnitude", "structured_wanda"])
def test_local_baselines_prune_every_group_alike(method):
    model = tiny_model("qwen2", layers=3)
    _, plan = _plan(model, f"{{method: {method}, sparsity: 0.5}}", _calib())
    n = plan.removed(0.5)
    mlp = [i for i, g in enumerate(plan.groups) if g.kind == "mlp"]
    lost = [plan.groups[i].n_units - len(plan.kept_units(n)[i]) for i in mlp]
    assert max(lost) - min(lost) <= 1
    if method == "structured_magnitude":   # inside a group, units leave in ascending sum |w|
        i = mlp[0]
        gate = [m for m in plan.groups[i].members if m[1] == 0][0][0]
        order = [u for g, u, _ in plan.order if g == i]
        sums = {u: float(v) for u, v in enumerate(unit_scores(plan.groups[i], {
            p: get_param(capture(model), p).detach().abs() for p, _, _ in plan.groups[i].members}))}
        assert [sums[u] for u in order] == sorted(sums[u] for u in order)
        assert gate


def test_margin_objective():
    model = tiny_model("llama", layers=2)
    pairs = [(torch.randint(0, 256, (5,)), torch.randint(0, 256, (3,)), torch.randint(0, 256, (2,))) for _ in range(3)]
    _, plan = _plan(model, "{method: gisp, sparsity: 0.3, steps: 2, objective: margin}", pairs=pairs)
    assert plan.max_level >= 0.3
    with pytest.raises(CalibrationError, match="pairs"):
        _plan(tiny_model("llama"), "{method: gisp, sparsity: 0.3, objective: margin}", _calib())
    with pytest.raises(CalibrationError, match="calibration"):
        _plan(tiny_model("llama"), "{method: gisp, sparsity: 0.3}")


def test_structured_then_mask_in_one_recipe():
    model = tiny_model("llama", layers=2)
    recipe = Recipe.from_yaml("passes: [{method: gisp, sparsity: 0.3, steps: 1}, {method: magnitude, sparsity: 0.5}]")
    result = compress(model, recipe, calibration=_calib(), progress=False)
    assert [r.name for r in result.reports] == ["annotate", "gisp", "annotate", "magnitude"]
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.shape[0] < 96 and (w == 0).float().mean() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("bad, match", [
    ("{method: gisp, sparsity: 0.2, level: 0.3}", "above sparsity"),
    ("{method: gisp, sparsity: 1.2}", "gisp.sparsity"),
    ("{method: gisp, kinds: [heads]}", "gisp.kinds"),
    ("{method: gisp, min_units: 0}", "min_units"),
    ("{method: gisp, steps: 0}", "gisp.steps"),
    ("{method: gisp, normalize: layer}", "gisp.normalize"),
    ("{method: gisp, objective: acc}", "gisp.objective"),
    ("{method: structured_wanda, sparsity: -0.1}", "structured_wanda.sparsity"),
])
def test_bad_configs_name_the_field(bad, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml(f"passes: [{bad}]")


def test_gisp_pass_repr_and_defaults():
    assert GispConfig().apply_level == 0.3 and GispConfig(level=0.0).apply_level == 0.0
    assert "steps=6" in repr(GispPass(GispConfig()))
