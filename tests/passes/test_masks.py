import pytest
import torch

from sparsefx.errors import RecipeError
from sparsefx.ir import annotated_linears
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.passes.masks import MASK, compute_mask
from sparsefx.pipeline import compress


@pytest.mark.parametrize("shape", [(1, 7), (13, 31), (5, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_drops_lowest_per_row(shape, sparsity):
    score = torch.rand(shape)
    mask = compute_mask(score, sparsity)
    k = int(shape[1] * sparsity)
    assert (mask.sum(1) == shape[1] - k).all()
    for row in range(shape[0]):
        kept, dropped = score[row][mask[row]], score[row][~mask[row]]
        if k and len(kept):
            assert dropped.max() <= kept.min()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_best_of_every_m(n, m):
    score = torch.rand(11, 3 * m)
    mask = compute_mask(score, (n, m))
    groups, g_score = mask.view(11, 3, m), score.view(11, 3, m)
    assert (groups.sum(-1) == n).all()
    kept_min = torch.where(groups, g_score, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, g_score, -torch.inf).amax(-1)
    assert (dropped_max <= kept_min).all()


def test_nm_needs_divisible_width():
    with pytest.raises(RecipeError, match="divisible by 4"):
        compute_mask(torch.rand(3, 10), (2, 4))


def test_zero_sparsity_recipe_reproduces_dense_logits_exactly(arch, tokens):
    model, ref = tiny_model(arch), tiny_model(arch)
    compress(model, Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.0}]"), progress=False)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)


@pytest.mark.parametrize("recipe", ["{method: magnitude, sparsity: 0.5}", "{method: wanda, pattern: '2:4'}",
                                    "{method: wanda, sparsity: 0.6}"])
def test_masks_apply_and_generate_works(arch, recipe, tokens):
    model, ref = tiny_model(arch), tiny_model(arch)
    calib = torch.randint(0, 256, (4, 32))
    result = compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), calibration=calib, progress=False)
    for node, info in annotated_linears(result.graph_module):
        w = model.get_parameter(info.param)
        if info.role == "lm_head":  # not in the default roles: untouched
            assert MASK not in node.meta and torch.equal(w, ref.get_parameter(info.param))
            continue
        expected = 0.5 if "0.5" in recipe or "2:4" in recipe else 0.6
        assert node.meta[MASK]["sparsity"] == pytest.approx(expected, abs=0.02)
        assert (w == 0).float().mean().item() == pytest.approx(expected, abs=0.02)
    out = model.generate(tokens[:1, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (1, 11)
    # the KV-cache path and a full forward agree on the compressed model
    with torch.no_grad():
        full = model(out[:, :-1]).logits[0, -1].argmax()
    assert full == out[0, -1]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_packed_nm_layers_compute_the_masked_model_and_round_trip(arch, pattern, tokens, tmp_path):
    from sparsefx.artifact import load_artifact, save_artifact
    from sparsefx.ops.nm.eager import NMLinear

    calib = torch.randint(0, 256, (4, 32))
    masked, packed = tiny_model(arch), tiny_model(arch)
    compress(masked, Recipe.from_yaml(f"passes: [{{method: wanda, pattern: '{pattern}'}}]"), calibration=calib,
             progress=False)
    recipe = Recipe.from_yaml(f"passes: [{{method: wanda, pattern: '{pattern}', pack: true}}]")
    result = compress(packed, recipe, calibration=calib, progress=False)
    nm = {name: m for name, m in packed.named_modules() if isinstance(m, NMLinear)}
    assert len(nm) == 7 * packed.config.num_hidden_layers
    assert result.report_dict()["passes"][-1]["details"]["packed"] == len(nm)
    for name, m in nm.items():      # stored: half the values plus one index byte per kept value, no dense weight
        assert m.nm_values.numel() * 2 == masked.get_submodule(name).weight.numel() and m.nm_index.dtype == torch.uint8
    with torch.no_grad():
        ref = masked(tokens).logits
        out = packed(tokens).logits                     # 13 rows per sequence: the unpack-and-GEMM path
        one = packed(tokens[:, :1]).logits              # one row: the gather path
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one, masked(tokens[:, :1]).logits, rtol=1e-4, atol=1e-4)
        art = load_artifact(save_artifact(tmp_path / "nm", packed, None, recipe, result.report_dict()))
        assert torch.equal(art.model(tokens).logits, out)
    gen = packed.generate(tokens[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
    assert gen.shape == (1, 9)


def test_pack_needs_an_nm_pattern():
    with pytest.raises(RecipeError, match="magnitude.pack stores N:M layers packed"):
        Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5, pack: true}]")
    # N:M only through an override is enough; the unstructured layers stay dense
    Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5, pack: true, overrides: {'*q_proj*': '2:4'}}]")


def test_wanda_mask_is_the_reference_score_mask_and_differs_from_magnitude():
    # Reference: Wanda's score |W| * ||X_j||_2 computed here from the dense weights and the attached statistics.
    model = tiny_model("llama")
    calib = torch.randint(0, 256, (4, 32))
    result = compress(model, Recipe.from_yaml("passes: [{method: wanda, sparsity: 0.5}]"), calibration=calib,
                      progress=False)
    dense = tiny_model("llama")
    differs = 0
    for node, info in annotated_linears(result.graph_module, roles=("q", "o", "up", "down")):
        l2 = node.meta["sparsefx.stats"].channel_l2
        w0 = dense.get_parameter(info.param)
        kept = model.get_parameter(info.param) != 0
        assert torch.equal(kept, compute_mask(w0.abs() * l2[None], 0.5))
        differs += int((kept != compute_mask(w0.abs(), 0.5)).sum())
    assert differs > 0


def test_per_layer_overrides(tokens):
    model = tiny_model("mistral")
    recipe = Recipe.from_yaml("""
passes:
  - method: magnitude
    sparsity: 0.5
    roles: [q, k, v, o, gate, up, down]
    overrides: {"model.layers.0.*": 0.0, "*.down_proj.*": "2:4"}
""")
    compress(model, recipe, progress=False)
    ref = tiny_model("mistral")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight)
    d = model.model.layers[1].mlp.down_proj.weight
    assert ((d != 0).view(d.shape[0], -1, 4).sum(-1) == 2).all()
    q = model.model.layers[1].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_roles_restrict_scope():
    model = tiny_model("llama")
    compress(model, Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5, roles: [gate, up]}]"),
             progress=False)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (model.model.layers[0].mlp.gate_proj.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("recipe, nonzero", [("{method: magnitude, pattern: '2:4', pack: true}", 0.5),
                                             ("{method: magnitude, pattern: '2:4'}", 0.5),
                                             ("{method: rtn, bits: 4, group_size: 32}", 1.0)])
def test_parameter_counts_see_compressed_linears(recipe, nonzero):
    # `sparsefx eval` prints these: a packed or quantized linear still stands for its in x out weights
    from sparsefx.eval import count_params

    model = tiny_model("llama")
    before = count_params(model)
    dense = before["linear_params"]
    compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), progress=False)
    counts = count_params(model)
    assert counts["linear_params"] == dense
    assert counts["linear_nonzero"] == pytest.approx(nonzero * dense, rel=0.01)
    # the model's totals too (packed and quantized linears hold buffers, not parameters)
    assert counts["params_total"] == before["params_total"]
    assert before["params_total"] - counts["params_nonzero"] == pytest.approx((1 - nonzero) * dense, rel=0.01)


@pytest.mark.parametrize("recipe", ["{method: rtn, bits: 4, group_size: 32}",
                                    "{method: rtn, bits: 3, group_size: 32, symmetric: true}"])
def test_stored_bits_per_weight_is_what_the_pass_reports(recipe):
    # the figure the export and llama.cpp benches print beside each variant: the quant pass's own bits_per_weight
    from sparsefx.eval import stored_bits_per_weight

    model = tiny_model("llama")
    assert stored_bits_per_weight(model) == 32.0
    result = compress(model, Recipe.from_yaml(f"passes: [{recipe}]"), progress=False)
    assert stored_bits_per_weight(model) == pytest.approx(result.reported("bits_per_weight"), rel=1e-6)


def test_stored_bits_per_weight_of_packed_nm():
    # 2:4 packed from fp32: half the weights kept at 32 bits, each with a uint8 position -> 16 + 4 bits per weight
    from sparsefx.eval import stored_bits_per_weight

    model = tiny_model("llama")
    compress(model, Recipe.from_yaml("passes: [{method: magnitude, pattern: '2:4', pack: true}]"), progress=False)
    assert stored_bits_per_weight(model) == pytest.approx(0.5 * 32 + 0.5 * 8)
