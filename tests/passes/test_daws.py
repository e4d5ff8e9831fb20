import pytest
import torch

from sparsefx.errors import RecipeError
from sparsefx.ir import annotated_linears, linear_nodes, verify
from sparsefx.ops.routed.format import band_of, pack_bands, tier_weight
from sparsefx.ops.routed.op import (banded_linear_math, banded_linear_reference, multitier_linear_math, multitier_linear_reference, tiered_linear_reference)
from sparsefx.models import tiny_model
from sparsefx.passes.calibrate import Observer
from sparsefx.passes.config import Recipe, config_from_dict
from sparsefx.passes.daws import TIERS, magnitude_quantiles, solve_levels, solve_tiers
from sparsefx.pipeline import compress

tiered = torch.ops.sparsefx.tiered_linear
multitier = torch.ops.sparsefx.multitier_linear
banded_op = torch.ops.sparsefx.banded_linear


@pytest.mark.parametrize("shape, out_f", [((1, 1, 7), 5), ((3, 13, 31), 17), ((2, 64), 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_op_matches_reference(shape, out_f, bias):
    x = torch.randn(shape)
    w, wm = torch.randn(out_f, shape[-1]), torch.randn(out_f, shape[-1])
    b = torch.randn(out_f) if bias else None
    for t_high, t_low in [(1.0, 0.3), (0.5, 0.5), (2.0, 0.0), (10.0, 5.0)]:
        torch.testing.assert_close(tiered(x, w, wm, b, t_high, t_low),
                                   tiered_linear_reference(x, w, wm, b, t_high, t_low), rtol=1e-5, atol=1e-5)


def test_zero_thresholds_are_exactly_dense():
    x, w = torch.randn(3, 11, 29), torch.randn(19, 29)
    b = torch.randn(19)
    assert torch.equal(tiered(x, w, torch.zeros_like(w), b, 0.0, 0.0), torch.nn.functional.linear(x, w, b))


def test_op_registration_checks():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    torch.library.opcheck(tiered, (x, w, w * 0.5, None, 0.8, 0.2))


def test_op_under_torch_compile():
    x, w, wm = torch.randn(2, 5, 8), torch.randn(4, 8), torch.randn(4, 8)
    fn = torch.compile(lambda x: tiered(x, w, wm, None, 0.8, 0.2), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), tiered_linear_reference(x, w, wm, None, 0.8, 0.2))


@pytest.mark.parametrize("shape, out_f", [((1, 1, 7), 5), ((3, 13, 31), 17), ((2, 64), 96)])
def test_multitier_op_matches_reference_and_tiered_linear(shape, out_f):
    x = torch.randn(shape)
    w = torch.randn(out_f, shape[-1])
    mediums = [torch.randn(out_f, shape[-1]) for _ in range(3)]
    b = torch.randn(out_f)
    # distinct, tied (empty tiers) and all-zero thresholds
    for ts in ([2.0, 1.0, 0.5, 0.1], [1.0, 1.0, 0.3, 0.3], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]):
        torch.testing.assert_close(multitier(x, w, mediums, b, ts), multitier_linear_reference(x, w, mediums, b, ts),
                                   rtol=1e-5, atol=1e-5)
    # one medium tier is tiered_linear; zero thresholds are exactly dense
    torch.testing.assert_close(multitier(x, w, mediums[:1], b, [1.0, 0.3]), tiered(x, w, mediums[0], b, 1.0, 0.3))
    assert torch.equal(multitier(x, w, mediums, b, [0.0] * 4), torch.nn.functional.linear(x, w, b))


def test_multitier_op_registration_and_compile():
    x, w = torch.randn(2, 5, 8), torch.randn(4, 8)
    mediums = [w * 0.5, w * 0.25]
    torch.library.opcheck(multitier, (x, w, mediums, None, [0.8, 0.4, 0.2]))
    fn = torch.compile(lambda x: multitier(x, w, mediums, None, [0.8, 0.4, 0.2]), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), multitier_linear_math(x, w, mediums, None, [0.8, 0.4, 0.2]))
    with pytest.raises(RuntimeError, match="need 3 thresholds"):
        multitier(x, w, mediums, None, [0.8, 0.2])
    from sparsefx.codegen.cpu import enable_cpu_kernels

    enable_cpu_kernels()  # and with the CPU kernel registered on the op (its C++ op checks too)
    with pytest.raises(RuntimeError, match="need 3 thresholds"):
        multitier(x, w, mediums, None, [0.8, 0.2])


def _banded(out_f, in_f, n_mediums=3):
    w = torch.randn(out_f, in_f)
    cuts = [float(w.abs().flatten().quantile(q)) for q in torch.linspace(0.25, 0.75, n_mediums).tolist()]
    return pack_bands(w, cuts)


@pytest.mark.parametrize("shape, out_f", [((1, 1, 7), 5), ((3, 13, 31), 17), ((2, 64), 96)])
def test_banded_op_matches_reference_and_multitier_linear(shape, out_f):
    x, b = torch.randn(shape), torch.randn(out_f)
    weight = _banded(out_f, shape[-1])
    for ts in ([2.0, 1.0, 0.5, 0.1], [1.0, 1.0, 0.3, 0.3], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]):
        ref = banded_linear_reference(x, weight, b, ts)
        torch.testing.assert_close(banded_op(x, weight, b, ts), ref, rtol=1e-5, atol=1e-5)
        # the same as multitier_linear over the tiers' weights taken apart
        torch.testing.assert_close(ref, multitier_linear_reference(x, tier_weight(weight, 0),
                                                                   [tier_weight(weight, k) for k in (1, 2, 3)], b, ts),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(banded_op(x, weight, b, [0.0] * 4), torch.nn.functional.linear(x, weight.float(), b))


def test_banded_op_registration_compile_and_checks():
    x, weight = torch.randn(2, 5, 8), _banded(4, 8, 2)
    ts = [0.8, 0.4, 0.2]
    torch.library.opcheck(banded_op, (x, weight, None, ts))
    fn = torch.compile(lambda x: banded_op(x, weight, None, ts), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), banded_linear_math(x, weight, None, ts))
    with pytest.raises(RuntimeError, match="expected 2 to 4 thresholds"):
        banded_op(x, weight, None, [0.8])
    with pytest.raises(RuntimeError, match="banded weight is fp16"):
        banded_op(x, weight.float(), None, ts)
    from sparsefx.codegen.cpu import enable_cpu_kernels

    enable_cpu_kernels()  # the CPU kernel registered on the op checks the same
    with pytest.raises(RuntimeError, match="expected 2 to 4 thresholds"):
        banded_op(x, weight, None, [0.8, 0.6, 0.4, 0.2, 0.1])


def test_magnitude_quantiles_keep_the_share():
    w = torch.randn(37, 53)
    for d, q in zip((0.75, 0.5, 0.1), magnitude_quantiles(w.abs(), (0.75, 0.5, 0.1))):
        assert (w.abs() >= q).sum().item() == round(d * w.numel())


def test_solve_levels_hits_target_and_orders_thresholds():
    obs = Observer(64)
    obs(torch.randn(4096, 64) * torch.linspace(0.1, 3, 64))
    stats = obs.stats()
    w_abs = torch.randn(32, 64).abs()
    densities = (1.0, 0.75, 0.5, 0.25, 0.0)
    boundary = magnitude_quantiles(w_abs, [0.875, 0.625, 0.375, 0.125])
    for e in (0.3, 0.5, 0.7):
        levels = solve_levels(stats, boundary, densities, e)
        assert list(levels.thresholds) == sorted(levels.thresholds, reverse=True)
        assert sum(levels.fractions) == pytest.approx(1.0)
        assert levels.effective_sparsity == pytest.approx(e, abs=0.02)
        # a channel's tier density is the level nearest the oracle's kept share P(|W| >= tau / |x|)
        tau = levels.thresholds[0] * boundary[0]
        for k, t in enumerate(levels.thresholds):
            assert t * boundary[k] == pytest.approx(tau, rel=1e-6)
    zero = solve_levels(stats, boundary, densities, 0.0)
    assert zero.thresholds == (0.0,) * 4 and zero.effective_sparsity == 0.0


def test_solve_tiers_hits_target_effective_sparsity():
    obs = Observer(64)
    obs(torch.randn(4096, 64) * torch.linspace(0.1, 3, 64))
    stats = obs.stats()
    # the last two: a wide medium tier at a high target (q_low + m would pass 1 without the second cap)
    for e, m, s in [(0.5, 0.2, 0.5), (0.4, 0.3, 0.5), (0.6, 0.0, 0.5), (0.1, 0.5, 0.5), (0.7, 0.6, 0.35),
                    (0.85, 0.6, 0.35)]:
        tiers = solve_tiers(stats, e, m, s)
        assert tiers.t_low <= tiers.t_high
        assert tiers.effective_sparsity(s) == pytest.approx(e, abs=0.02)
    zero = solve_tiers(stats, 0.0, 0.2, 0.5)
    assert zero.t_high == zero.t_low == 0.0


@pytest.mark.parametrize("entry, field", [
    ({"method": "daws", "sparsity": 1.0}, "daws.sparsity"),
    ({"method": "daws", "medium_fraction": 1.5}, "daws.medium_fraction"),
    ({"method": "daws", "medium_weight_sparsity": -0.1}, "daws.medium_weight_sparsity"),
    ({"method": "daws", "roles": ["lm_head"]}, "daws.roles"),
    ({"method": "daws", "medium_dtype": "int8"}, "daws.medium_dtype"),
])
def test_invalid_daws_values(entry, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        config_from_dict(entry)


def test_pass_rewrites_lowers_and_generates(arch, tokens):
    model = tiny_model(arch)
    calib = torch.randint(0, 256, (8, 32))
    result = compress(model, Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, roles: [q, k, v, o, gate, "
                                              "up, down]}]"), calibration=calib, progress=False)
    gm = result.graph_module
    report = result.reports[-1]
    assert report.matches == 7 * model.config.num_hidden_layers
    assert report.details["effective_sparsity"] == pytest.approx(0.5, abs=0.03)
    rewritten = [n for n in linear_nodes(gm) if n.target == tiered.default]
    assert len(rewritten) == report.matches and all(TIERS in n.meta for n in rewritten)
    assert len(annotated_linears(gm)) == report.matches + 1  # still annotated, lm_head untouched
    verify(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens), model(tokens).logits, rtol=0, atol=0)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "TieredLinear"
    out = model.generate(tokens[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_measured_effective_sparsity_on_the_calibration_data():
    # The predicted tier fractions must match what the op actually does on the calibration tokens.
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32))
    result = compress(model, Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, roles: [down]}]"),
                      calibration=calib, progress=False)
    seen = []
    mod = model.model.layers[1].mlp.down_proj
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs()))
    with torch.no_grad():
        model(calib)
    h.remove()
    a = torch.cat([s.flatten() for s in seen])
    p_low = (a < mod.t_low).float().mean().item()
    p_med = ((a >= mod.t_low) & (a < mod.t_high)).float().mean().item()
    node = next(n for n in linear_nodes(result.graph_module) if n.meta.get(TIERS) and
                n.meta["sparsefx.linear"].param == "model.layers.1.mlp.down_proj.weight")
    assert p_low == pytest.approx(node.meta[TIERS]["p_low"], abs=0.02)
    assert p_med == pytest.approx(node.meta[TIERS]["p_medium"], abs=0.02)


@pytest.mark.parametrize("tiers, op, n_mediums", [([0.35], tiered.default, 1), ([0.25, 0.5, 0.75], multitier.default, 3)])
def test_medium_tiers_route_by_products(tiers, op, n_mediums, tokens):
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32))
    result = compress(model, Recipe.from_yaml(f"passes: [{{method: daws, sparsity: 0.5, medium_tiers: {tiers}}}]"),
                      calibration=calib, progress=False)
    gm, report = result.graph_module, result.reports[-1]
    assert report.details["effective_sparsity"] == pytest.approx(0.5, abs=0.03)
    nodes = [n for n in linear_nodes(gm) if n.target == op]
    assert len(nodes) == report.matches == 7 * model.config.num_hidden_layers
    verify(gm)
    up = model.model.layers[0].mlp.up_proj
    mediums = [up.weight_medium] if n_mediums == 1 else up.mediums
    w_abs = up.weight.abs()
    for s_w, wm in zip(tiers, mediums):
        # each medium tier keeps the largest |W| of the whole matrix at its density, so the masks nest
        assert (wm != 0).float().mean().item() == pytest.approx(1 - s_w, abs=0.01)
        assert w_abs[wm != 0].min() >= w_abs[wm == 0].max()
    if n_mediums > 1:
        assert type(up).__name__ == "MultiTierLinear"
        assert all(((a == 0) | (b != 0)).all() for a, b in zip(mediums[1:], mediums))  # nested
        x = torch.randn(3, 5, up.in_features)
        torch.testing.assert_close(up(x), multitier_linear_reference(x, up.weight, mediums, None, up.thresholds))
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens), model(tokens).logits, rtol=1e-5, atol=1e-5)
    out = model.generate(tokens[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_banded_layout_holds_the_separate_layouts_tiers_in_one_matrix(tokens):
    calib = torch.randint(0, 256, (8, 32))
    models, gms = {}, {}
    for layout in ("separate", "banded"):
        models[layout] = tiny_model("llama")
        torch.manual_seed(0)
        result = compress(models[layout], Recipe.from_yaml(f"passes: [{{method: daws, sparsity: 0.5, medium_tiers: "
                                                           f"[0.25, 0.5, 0.75], layout: {layout}}}]"),
                          calibration=calib, progress=False)
        gms[layout] = result.graph_module
        assert result.reports[-1].details["effective_sparsity"] == pytest.approx(0.5, abs=0.03)
        assert result.reports[-1].details.get("bits_per_weight") == (16.0 if layout == "banded" else None)
    from sparsefx.eval import count_params

    # the banded linears still count as the weights they stand for
    counts = {k: count_params(m) for k, m in models.items()}
    assert counts["banded"]["linear_params"] == counts["separate"]["linear_params"] > 0
    # ... in the model's total too, though banded linears hold buffers, not parameters
    assert counts["banded"]["params_total"] == counts["separate"]["params_total"] == \
        sum(p.numel() for p in tiny_model("llama").parameters())
    gm = gms["banded"]
    verify(gm)
    assert len([n for n in linear_nodes(gm) if n.target == banded_op.default]) == 7 * 2
    for name in ("layers.0.mlp.up_proj", "layers.1.self_attn.o_proj"):
        sep, band = (models[k].model.get_submodule(name) for k in ("separate", "banded"))
        assert type(band).__name__ == "BandedLinear" and not hasattr(band, "weight")   # no fp32 copy kept
        assert band.weight_banded.dtype == torch.float16
        assert band.thresholds == sep.thresholds       # the same routing
        for k, wm in enumerate(sep.mediums, start=1):  # the same tiers, at about bf16's precision
            assert torch.equal(band_of(band.weight_banded) >= k, wm != 0)
            torch.testing.assert_close(tier_weight(band.weight_banded, k), wm, rtol=2 ** -9, atol=1e-7)
        x = torch.randn(3, 5, band.in_features)
        torch.testing.assert_close(band(x), banded_linear_reference(x, band.weight_banded, band.bias, band.thresholds))
    with torch.no_grad():
        logits = models["banded"](tokens).logits
        torch.testing.assert_close(gm(tokens), logits, rtol=1e-5, atol=1e-5)
        # fp16 storage moves the logits (a little, and channels at a threshold's edge switch tiers), far less than
        # DAWS itself moves them from dense
        separate, dense = models["separate"](tokens).logits, tiny_model("llama")(tokens).logits
        assert (logits - separate).norm() < 0.3 * (dense - separate).norm()
    out = models["banded"].generate(tokens[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_banded_layout_with_greedy_allocation_meets_the_budget():
    model = tiny_model("llama")
    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.3, 0.6], layout: banded, "
                              "allocation: greedy, greedy_step: 0.1}]")
    report = compress(model, recipe, calibration=torch.randint(0, 256, (8, 32)), progress=False).reports[-1]
    assert report.details["effective_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert len({round(p["target"], 2) for p in report.details["per_param"].values()}) > 1


def test_medium_tiers_with_greedy_allocation_meet_the_budget():
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32))
    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.3, 0.6], allocation: greedy, "
                              "greedy_step: 0.1}]")
    report = compress(model, recipe, calibration=calib, progress=False).reports[-1]
    assert report.details["effective_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert len({round(p["target"], 2) for p in report.details["per_param"].values()}) > 1


@pytest.mark.parametrize("entry, field", [
    ({"method": "daws", "medium_tiers": [0.5, 0.25]}, "daws.medium_tiers"),
    ({"method": "daws", "medium_tiers": [0.0, 0.5]}, "daws.medium_tiers"),
    ({"method": "daws", "medium_tiers": [0.5, 1.0]}, "daws.medium_tiers"),
    ({"method": "daws", "medium_tiers": "0.5"}, "daws.medium_tiers"),
    ({"method": "daws", "layout": "packed"}, "daws.layout"),
    ({"method": "daws", "layout": "banded"}, "daws.layout"),                                    # no medium_tiers
    ({"method": "daws", "layout": "banded", "medium_tiers": [0.2, 0.4, 0.6, 0.8]}, "daws.layout"),  # > 3 tiers
    ({"method": "daws", "layout": "banded", "medium_tiers": [0.5], "medium_dtype": "bfloat16"}, "daws.layout"),
    ({"method": "daws", "allocation": "random"}, "daws.allocation"),
    ({"method": "daws", "greedy_tokens": 0}, "daws.greedy_tokens"),
    ({"method": "daws", "greedy_step": 0.0}, "daws.greedy_step"),
    ({"method": "daws", "sparsity": 0.6, "max_sparsity": 0.5}, "daws.max_sparsity"),
])
def test_invalid_allocation_values(entry, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        config_from_dict(entry)


def test_greedy_allocation_meets_each_block_budget_and_beats_uniform():
    from sparsefx.passes.allocate import split_by_layer

    calib = torch.randint(0, 256, (8, 32))
    recipe = "passes: [{{method: daws, sparsity: 0.5, medium_fraction: 0.0, allocation: {}}}]"
    results = {}
    for alloc in ("uniform", "greedy"):
        torch.manual_seed(0)
        model = tiny_model("llama")
        results[alloc] = (model, compress(model, Recipe.from_yaml(recipe.format(alloc)), calibration=calib,
                                          progress=False))
    model, greedy = results["greedy"]
    per_param = greedy.reports[-1].details["per_param"]
    targets = [v["target"] for v in per_param.values()]
    assert len(set(round(t, 3) for t in targets)) > 1  # not uniform
    assert max(targets) <= 0.9 + 1e-9
    # every layer keeps its MAC-weighted budget
    macs = {n: model.get_parameter(n).numel() for n in per_param}
    for layer in range(model.config.num_hidden_layers):
        names = [n for n in per_param if f"layers.{layer}." in n]
        mean = sum(per_param[n]["target"] * macs[n] for n in names) / sum(macs[n] for n in names)
        assert mean == pytest.approx(0.5, abs=1e-3)  # targets are reported to 4 decimals
    # the greedy choice lowers the block output error it minimises, measured independently on the eager model
    errors = {}
    for alloc, (m, res) in results.items():
        dense = tiny_model("llama")  # same seed -> same weights as before compression
        errs = []
        for layer in range(m.config.num_hidden_layers):
            cap = {}
            h = dense.model.layers[layer].register_forward_hook(
                lambda mod, a, kw, out: cap.update(io=(a, kw, out)), with_kwargs=True)  # returns None: output kept
            with torch.no_grad():
                dense(calib[:1])
            h.remove()
            a, kw, out = cap["io"]
            with torch.no_grad():
                got = m.model.layers[layer](*a, **kw)
            got, out = (got[0] if isinstance(got, tuple) else got), (out[0] if isinstance(out, tuple) else out)
            errs.append(float((got - out).pow(2).sum() / out.pow(2).sum()))
        errors[alloc] = sum(errs)
    assert errors["greedy"] < errors["uniform"]
    # the split used by the search reproduces the unsplit graph
    split, names = split_by_layer(greedy.graph_module)
    assert len(names) == model.config.num_hidden_layers
    with torch.no_grad():
        out = split(calib[:2])
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, greedy.graph_module(calib[:2]), rtol=0, atol=0)


def test_fp16_medium_tier_is_stored_half_and_matches_the_reference(tokens):
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32))
    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, medium_fraction: 0.4, medium_dtype: float16}]")
    gm = compress(model, recipe, calibration=calib, progress=False).graph_module
    verify(gm)
    up = model.model.layers[0].mlp.up_proj
    assert up.weight_medium.dtype == torch.float16 and up.weight.dtype == torch.float32
    x = torch.randn(3, 5, up.in_features)
    with torch.no_grad():
        want = tiered_linear_reference(x.double(), up.weight.double(), up.weight_medium.double(), None,
                                       up.t_high, up.t_low)
        torch.testing.assert_close(up(x).double(), want, rtol=1e-5, atol=1e-5)
        # the graph and the lowered HF model agree
        torch.testing.assert_close(gm(tokens), model(tokens).logits, rtol=0, atol=0)
