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


def test_every_builtin_recipe_has_a_one_line_description():
    for name, path in builtin_recipes().items():
        r = Recipe.load(path)
        assert r.name == name, path
        assert r.description and "\n" not in r.description and len(r.description) <= 80, name


def test_the_recommended_recipes_are_built_in():
    # the configurations README and docs recommend must work from an installed package, not only from bench/
    for name in ("daws-50-mt3-banded", "daws-50-mt3-banded-head8", "rtn-w3-g64", "rtn-w4-g64", "rtn-w3-g64-head8",
                 "gptq-w3-g64", "gptq-w4-g64", "gptq-w4-g128", "dam-3.375"):
        assert resolve_recipe(name).name == name


def test_every_recipe_the_readme_and_docs_name_is_built_in():
    """`-r NAME` in README.md and docs/*.md (not a .yaml path, not a placeholder) resolves from the package alone."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    named = {m for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
             for m in re.findall(r"(?:compress|sweep\.py) \S+ -r ([a-z][\w.@-]*)", doc.read_text())
             if not m.endswith((".yaml", ".yml"))}
    assert {"wanda-2of4", "daws-50-mt3-banded", "rtn-w3-g64", "gptq-w4-g128"} <= named      # the scan finds them
    for name in sorted(named):
        assert resolve_recipe(name).name == name


def test_yaml_errors_name_the_file_and_the_place(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: x\npasses:\n  - method: wanda\n    sparsity: [0.5\n")
    with pytest.raises(RecipeError, match=r"recipe .*mine\.yaml is not valid YAML at line \d+, column \d+") as e:
        resolve_recipe(bad)
    assert "<unicode string>" not in str(e.value)
    field = tmp_path / "field.yaml"
    field.write_text("passes: [{method: wanda, sparsity: 1.5}]\n")
    with pytest.raises(RecipeError, match=r"field\.yaml: wanda\.sparsity"):
        resolve_recipe(field)


def test_a_missing_recipe_file_says_file_not_found(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        resolve_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        resolve_recipe("recipes/mine.yml")


def test_description_round_trips_and_must_be_text(tmp_path):
    r = Recipe.from_yaml("name: a\ndescription: ' what it does '\npasses: [{method: magnitude, sparsity: 0.5}]")
    assert r.description == "what it does"
    r.save(tmp_path / "a.yaml")
    assert Recipe.load(tmp_path / "a.yaml") == r
    with pytest.raises(RecipeError, match="description must be a string"):
        Recipe.from_yaml("description: [1]\npasses: [{method: magnitude, sparsity: 0.5}]")
