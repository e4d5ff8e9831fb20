import pytest

from sparsefx.errors import RecipeError
from sparsefx.passes.base import AnnotatePass, Pass, PassError, PassManager, PassReport, PassResult
from sparsefx.passes.calibrate import CalibratePass
from sparsefx.passes.masks import MagnitudeConfig, MagnitudePass, WandaConfig, WandaPass
from sparsefx.ir import capture


class _Breaker(Pass):
    """Corrupts the IR on purpose: drops the shape metadata of the first linear."""

    name = "breaker"
    requires = ("annotated",)

    def run(self, gm, ctx):
        from sparsefx.ir import linear_nodes

        del linear_nodes(gm)[0].meta["val"]
        return PassResult(gm, True, PassReport(self.name))


def test_order_is_checked():
    with pytest.raises(RecipeError, match="'wanda' requires stage.*calibrated"):
        PassManager([AnnotatePass(), WandaPass(WandaConfig(sparsity=0.5))]).check_order()
    with pytest.raises(RecipeError, match="'magnitude' requires"):
        PassManager([MagnitudePass(MagnitudeConfig(sparsity=0.5)), AnnotatePass()]).check_order()
    PassManager([AnnotatePass(), CalibratePass(), WandaPass(WandaConfig(sparsity=0.5))]).check_order()


def test_verification_names_the_pass_that_broke_the_graph(llama):
    gm = capture(llama)
    with pytest.raises(PassError, match="after pass 'breaker'"):
        PassManager([AnnotatePass(), _Breaker()]).run(gm)


def test_reports_and_stage_bookkeeping(llama):
    gm = capture(llama)
    gm, reports = PassManager([AnnotatePass(), MagnitudePass(MagnitudeConfig(sparsity=0.25))]).run(gm)
    assert [r.name for r in reports] == ["annotate", "magnitude"]
    assert reports[0].details["roles"]["q"] == 2 and not reports[0].modified
    assert reports[1].matches == 14 and reports[1].modified
    assert len(reports[1].params_changed) == 14
    assert reports[1].nodes_added == [] and reports[1].nodes_removed == []
    assert gm.meta["sparsefx.stages"] == ["annotated", "masked"]
    # A second manager run on the same graph knows annotation already happened.
    PassManager([MagnitudePass(MagnitudeConfig(sparsity=0.25))]).check_order(tuple(gm.meta["sparsefx.stages"]))


def test_the_last_pass_reporting_a_key_is_what_a_run_reports(llama):
    from sparsefx.pipeline import compress, last_reported
    from sparsefx.passes.config import Recipe

    result = compress(llama, Recipe.from_yaml("passes:\n  - {method: magnitude, sparsity: 0.5}\n"
                                              "  - {method: rtn, bits: 4, group_size: 32}\n"), progress=False)
    assert [r.name for r in result.reports][-2:] == ["magnitude", "rtn"]
    assert result.reported("bits_per_weight") == result.reports[-1].details["bits_per_weight"] > 4
    assert result.reported("sparsity") == result.reports[-2].details["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result.reported("no_such_key") is None
    details = [{"sparsity": 0.3}, {"bits_per_weight": 3.5, "sparsity": None}, {"sparsity": 0.6}]
    assert last_reported(details, "sparsity") == 0.6 and last_reported(details[:2], "sparsity") == 0.3


def test_needs_calibration_is_the_pass_contracts_one_definition():
    import importlib

    from sparsefx.passes.config import _BUILTIN_MODULES, _CONFIGS, _PASSES, Recipe

    class Reads(Pass):
        requires = ("annotated", "calibrated")

    class Feeds(Pass):
        uses_calibration = True

    assert Reads().needs_calibration and Feeds().needs_calibration and not Pass().needs_calibration
    for module in set(_BUILTIN_MODULES.values()):
        importlib.import_module(module)
    passes = {method: _PASSES[config] for method, config in _CONFIGS.items()}
    needs = {method for method, cls in passes.items() if cls.uses_calibration or "calibrated" in cls.requires}
    assert {"wanda", "daws", "gptq", "dam", "gisp", "cats"} <= needs
    assert not needs & {"magnitude", "rtn", "structured_magnitude"}
    built = 0
    for method in passes:                         # a recipe needs calibration exactly when one of its passes does
        fields = {"bits": 4} if method in ("rtn", "gptq") else {"budget": 4.5} if method in (
            "svd", "q_then_l", "l_then_q", "dam") else {"sparsity": 0.3}
        try:
            recipe = Recipe.from_dict({"passes": [{"method": method, **fields}]})
        except RecipeError:
            continue
        built += 1
        assert recipe.needs_calibration == (method in needs), method
    assert built >= 10
