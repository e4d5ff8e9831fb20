"""sparsefx plot: what it draws from sweep and task tables, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sparsefx.cli import main
from sparsefx.errors import DataError
from sparsefx.plot import family, load_series, plot

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _sweep(tmp_path, name="sweep"):
    rows = [
        {"variant": "dense", "ppl": 20.0, "linear_sparsity": 0.0003, "effective_sparsity": None},
        {"variant": "teal-50", "ppl": 30.0, "linear_sparsity": 0.0, "effective_sparsity": 0.5},
        {"variant": "teal-40", "ppl": 25.0, "linear_sparsity": 0.0, "effective_sparsity": 0.4},
        {"variant": "wanda-50", "ppl": 40.0, "linear_sparsity": 0.5},
        {"variant": "rtn-w3-g64", "ppl": 60.0, "linear_sparsity": 0.0, "bits_per_weight": 3.375},
    ]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    return path


def _tasks(tmp_path, meta=True):
    rows = [{"variant": v, "task": t, "acc": a, "acc_stderr": 0.02, "n": 100}
            for v, base in (("dense", 0.5), ("daws-50", 0.48), ("gptq-w4-g64", 0.47))
            for t, a in (("piqa", base + 0.1), ("mean", base))]
    path = tmp_path / "tasks_x.json"
    path.write_text(json.dumps(rows))
    if meta:
        (tmp_path / "tasks_x_meta.json").write_text(json.dumps({"variants": {
            "dense": {"sparsity": None, "bits_per_weight": None},
            "daws-50": {"sparsity": 0.5, "bits_per_weight": 16.0},
            "gptq-w4-g64": {"sparsity": None, "bits_per_weight": 4.375}}}))
    return path


def test_family_drops_the_number_and_the_bit_width():
    assert [family(v) for v in ("teal-40", "gisp-0.2", "rtn-w3-g64", "daws-50-mt3-banded", "dense")] == \
        ["teal", "gisp", "rtn-g64", "daws-50-mt3-banded", "dense"]


def test_sweep_points_take_the_sparsity_that_was_measured(tmp_path):
    pts = {p.variant: p for p in load_series(_sweep(tmp_path)).points}
    assert pts["dense"].sparsity == 0.0 and pts["dense"].dense
    assert pts["teal-50"].sparsity == 0.5 and pts["wanda-50"].sparsity == 0.5
    assert pts["rtn-w3-g64"].sparsity is None and pts["rtn-w3-g64"].bits == 3.375


def test_plot_draws_families_sorted_with_dense_as_a_line(tmp_path):
    out = tmp_path / "fig.png"
    drawn = plot([_sweep(tmp_path)], out, x="sparsity")
    assert drawn["x"] == "sparsity" and drawn["skipped"] == 1          # rtn has no sparsity
    assert drawn["panels"]["ppl"] == [("sweep: teal", [0.4, 0.5], [25.0, 30.0]), ("sweep: wanda", [0.5], [40.0])]
    assert drawn["dense"]["ppl"] == [("sweep", 20.0)]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fig")] == []     # no temp file left


def test_task_table_uses_its_meta_for_the_axis_and_adds_an_accuracy_panel(tmp_path):
    out = tmp_path / "both.svg"
    drawn = plot([_sweep(tmp_path), _tasks(tmp_path)], out, x="bits")
    assert drawn["panels"]["acc"] == [("tasks_x: daws", [16.0], [0.48]), ("tasks_x: gptq-g64", [4.375], [0.47])]
    assert drawn["panels"]["ppl"] == [("sweep: rtn-g64", [3.375], [60.0])]
    assert drawn["dense"]["acc"] == [("tasks_x", 0.5)]
    assert out.read_text().lstrip().startswith("<?xml")
    piqa = plot([_tasks(tmp_path)], tmp_path / "piqa.png", x="sparsity", task="piqa")
    assert piqa["panels"]["acc"] == [("tasks_x: daws", [0.5], [pytest.approx(0.58)])]


def test_auto_axis_is_the_one_most_variants_have(tmp_path):
    assert plot([_sweep(tmp_path)], tmp_path / "a.png")["x"] == "sparsity"
    assert plot([RESULTS / "quant_smollm2.json"], tmp_path / "q.png")["x"] == "bits"


def test_ptq_study_configs_plot_at_their_bits_with_a_category(tmp_path):
    def cfg(variant, method, bpw, ppl, app, mem):
        return {"variant": variant, "method": method, "bits_per_weight": bpw, "ppl": ppl, "categories": {
            "application": {"acc": app, "acc_stderr": 0.03}, "memorization": {"acc": mem, "acc_stderr": 0.04}}}

    path = tmp_path / "tasks_ptq.json"
    path.write_text(json.dumps({"meta": {}, "configs": [
        cfg("dense", "dense", None, 20.0, 0.6, 0.1), cfg("rtn-w4-g64", "rtn", 4.375, 25.0, 0.55, 0.08),
        cfg("rtn-w3-g64", "rtn", 3.375, 60.0, 0.45, 0.05), cfg("gptq-w3-g64-c32", "gptq", 3.375, 44.0, 0.5, 0.06)]}))
    drawn = plot([path], tmp_path / "s.png")
    assert drawn["x"] == "bits"
    assert drawn["panels"]["acc"] == [("tasks_ptq: rtn-g64", [3.375, 4.375], [pytest.approx(0.25), 0.315]),
                                      ("tasks_ptq: gptq-g64-c32", [3.375], [0.28])]
    assert drawn["panels"]["ppl"][0] == ("tasks_ptq: rtn-g64", [3.375, 4.375], [60.0, 25.0])
    app = plot([path], tmp_path / "a.png", task="application")
    assert app["panels"]["acc"][0][2] == [0.45, 0.55] and app["dense"]["acc"] == [("tasks_ptq", 0.6)]
    with pytest.raises(DataError, match="no category 'reasoning'.*application, memorization"):
        plot([path], tmp_path / "r.png", task="reasoning")


@pytest.mark.parametrize("setup, match", [
    (lambda d: d / "missing.json", "does not exist"),
    (lambda d: (d / "x.csv").write_text("variant,ppl\n") and d / "x.csv", "not a JSON results file"),
    (lambda d: (d / "y.json").write_text('{"a": 1}') and d / "y.json", "not a sweep table"),
])
def test_bad_results_files_are_named(tmp_path, setup, match):
    with pytest.raises(DataError, match=match):
        plot([setup(tmp_path)], tmp_path / "f.png")


def test_unknown_task_and_empty_axis_and_bad_suffix_are_refused(tmp_path):
    with pytest.raises(DataError, match="no rows for task 'hellaswag'.*mean, piqa"):
        plot([_tasks(tmp_path)], tmp_path / "f.png", task="hellaswag")
    with pytest.raises(DataError, match="no variant .* on the sparsity axis .*--x bits"):
        plot([RESULTS / "quant_smollm2.json"], tmp_path / "f.png", x="sparsity")
    with pytest.raises(DataError, match=r"must end in \.png"):
        plot([_sweep(tmp_path)], tmp_path / "f.jpg")
    without_meta = _tasks(tmp_path / "m", meta=False) if (tmp_path / "m").mkdir() is None else None
    with pytest.raises(DataError, match="no variant"):           # no meta: no variant can be placed
        plot([without_meta], tmp_path / "f.png", x="bits")
    assert not (tmp_path / "f.png").exists()


def test_cli_plots_what_demo_json_writes(tmp_path, monkeypatch, capsys):
    """`sparsefx demo --json demo.json` then `sparsefx plot demo.json`: the README's example, from the rows the demo's
    sweep returns (its table is the rows alone, not {'meta', 'rows'})."""
    from sparsefx import experiments

    rows = [{"variant": "dense", "ppl": 17.2, "ppl_vs_dense": 1.0, "linear_sparsity": 0.0001,
             "effective_sparsity": None, "bits_per_weight": None},
            {"variant": "magnitude-50", "ppl": 250.7, "ppl_vs_dense": 14.5, "linear_sparsity": 0.5,
             "effective_sparsity": None, "bits_per_weight": None},
            {"variant": "wanda-50", "ppl": 39.5, "ppl_vs_dense": 2.29, "linear_sparsity": 0.5,
             "effective_sparsity": None, "bits_per_weight": None}]
    monkeypatch.setattr(experiments, "sweep", lambda *a, on_row=None, **k: rows)
    demo, png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--no-speed", "--json", str(demo)]) == 0
    pts = {p.variant: p for p in load_series(demo).points}
    assert pts["dense"].dense and pts["wanda-50"].sparsity == 0.5 and pts["magnitude-50"].ppl == 250.7
    capsys.readouterr()
    assert main(["plot", str(demo), "-o", str(png)]) == 0
    assert Image.open(png).size[0] > 100 and "against sparsity" in capsys.readouterr().out


def test_cli_plots_committed_results(tmp_path, capsys):
    out = tmp_path / "daws.png"
    assert main(["plot", str(RESULTS / "daws_smollm2.json"), str(RESULTS / "masks_smollm2.json"),
                 "-o", str(out)]) == 0
    assert out.is_file() and "against sparsity" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nope.json"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
