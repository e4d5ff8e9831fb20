import pytest

from sparsefx.errors import RecipeError
from sparsefx.passes.config import Recipe, builtin_recipes, config_from_dict, resolve_recipe
from sparsefx.passes.masks import MagnitudeConfig, WandaConfig


@pytest.mark.parametrize("entry, field", [
    ({"method": "magnitude", "sparsity": 1.0}, "magnitude.sparsity"),
    ({"method": "magnitude", "sparsity": -0.1}, "magnitude.sparsity"),
    ({"method": "wanda", "sparsity": "half"}, "wanda.sparsity"),
    ({"method": "wanda", "pattern": "4:2"}, "wanda.pattern"),
    ({"method": "wanda", "pattern": "2:2"}, "wanda.pattern"),
    ({"method": "wanda", "pattern": "2-4"}, "wanda.pattern"),
    ({"method": "wanda"}, "exactly one of sparsity"),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, "exactly one of sparsity"),
    ({"method": "wanda", "sparsity": 0.5, "roles": ["q", "attn"]}, "wanda.roles"),
    ({"method": "wanda", "sparsity": 0.5, "overrides": {"*.q_proj.*": 1.5}}, "overrides"),
    ({"method": "wanda", "sparsity": 0.5, "sparsty": 0.2}, "unknown field"),
    ({"method": "pruneit", "sparsity": 0.5}, "unknown method 'pruneit'"),
])
def test_invalid_values_name_the_field(entry, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.").replace("*", r"\*")):
        config_from_dict(entry)


def test_recipe_level_errors():
    with pytest.raises(RecipeError, match="non-empty list"):
        Recipe.from_yaml("passes: []")
    with pytest.raises(RecipeError, match="calibration.samples"):
        Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]\ncalibration: {samples: 0}")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("passes: [method: {")
    with pytest.raises(RecipeError, match="unknown field"):
        Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]\nstages: 3")


def test_yaml_round_trip(tmp_path):
    r = Recipe.from_yaml("""
name: mixed
calibration: {samples: 8, seqlen: 64}
passes:
  - method: wanda
    pattern: "4:8"
    roles: [gate, up, down]
    overrides: {"model.layers.0.*": 0.0, "*.down_proj.*": "2:4"}
""")
    assert isinstance(r.passes[0], WandaConfig)
    assert r.passes[0].roles == ("gate", "up", "down")
    r.save(tmp_path / "r.yaml")
    again = Recipe.load(tmp_path / "r.yaml")
    assert again == r
    assert again.passes[0].target_for("model.layers.3.mlp.down_proj.weight") == (2, 4)
    assert again.passes[0].target_for("model.layers.0.mlp.down_proj.weight") == 0.0
    assert again.passes[0].target_for("model.layers.3.mlp.up_proj.weight") == (4, 8)


def test_configs_are_frozen():
    c = MagnitudeConfig(sparsity=0.5)
    with pytest.raises(Exception):
        c.sparsity = 0.9


def test_builtin_recipes_load():
    names = builtin_recipes()
    assert {"wanda-50", "magnitude-50", "wanda-2of4", "dense"} <= set(names)
    for name in names:
        assert resolve_recipe(name).passes
    with pytest.raises(RecipeError, match="neither a YAML file nor a built-in"):
        resolve_recipe("no-such-recipe")


def test_calibration_need_is_derived_from_passes():
    assert resolve_recipe("wanda-50").needs_calibration
    assert not resolve_recipe("magnitude-50").needs_calibration
