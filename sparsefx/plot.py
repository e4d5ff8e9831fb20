"""``sparsefx plot``: accuracy and perplexity against sparsity or bits per weight, from results files.

Reads the files our benchmarks write to ``bench/results/`` and the table ``sparsefx demo --json`` writes:

- a sweep table, ``{"meta": ..., "rows": [...]}`` (``bench/masks.py``, ``daws.py``, ``quant.py``, ``gisp.py``, ...),
  or its rows alone, a list of ``{"variant", "ppl", ...}`` (``sparsefx demo --json``):
  each row's ``ppl``, at ``effective_sparsity`` (activation sparsity: the share of multiply-adds skipped), else
  ``linear_sparsity`` (zeroed weights), else a structured ``level``; and at ``bits_per_weight`` for quantized rows;
- a task table, a list of ``{"variant", "task", "acc", "acc_stderr", "n"}`` rows (``bench/task_sweep.py``): each
  variant's accuracy on ``--task`` (default the ``mean`` row), placed on the x-axis by the ``sparsity`` /
  ``bits_per_weight`` that ``<name>_meta.json`` beside it records per variant;
- the PTQ study, ``{"configs": [...]}`` (``bench/ptq_study.py``): each config's perplexity and its accuracy on the
  knowledge category ``--task`` names (default: the mean over categories), at its bits per weight.

One panel per metric found (perplexity on a log scale, accuracy with its standard error as a bar); one series per
file and method family (the variant name without its trailing number: ``teal-40``, ``teal-50`` -> ``teal``), the
dense model as a dashed line. Rows that have no value on the chosen axis are left out and counted in the summary.

Example:
    >>> plot(["bench/results/daws_smollm2.json"], "daws.png")          # doctest: +SKIP
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._cache import atomic_write_bytes
from .errors import DataError
from .stats import mean_of_estimates

AXES = {"sparsity": "sparsity (share of linear weights / multiply-adds removed)",
        "bits": "bits per weight (linears, stored)"}
SUFFIXES = (".png", ".pdf", ".svg")


@dataclass
class Point:
    """One variant of one results file: where it sits on either axis and what it scored."""
    variant: str
    sparsity: float | None = None
    bits: float | None = None
    ppl: float | None = None
    acc: float | None = None
    acc_stderr: float | None = None

    @property
    def dense(self) -> bool:
        return self.variant == "dense"


@dataclass
class Series:
    label: str                       # the file's stem
    points: list[Point] = field(default_factory=list)


def family(variant: str) -> str:
    """The method a variant belongs to: its name without a trailing number or level and without its bit width
    (``daws-50`` -> ``daws``, ``gisp-0.2`` -> ``gisp``, ``rtn-w3-g64`` -> ``rtn-g64``)."""
    name = re.sub(r"-w\d+(?=-|$)", "", variant)
    return re.sub(r"([-@_]\d+(\.\d+)?%?|\(\d+%\))$", "", name) or variant


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sweep_point(row: dict) -> Point:
    name = row.get("variant") or (f"{row['method']}-{row['level']:g}" if "method" in row and row.get("level")
                                  else row.get("method", "?"))
    if row.get("method") == "dense":
        name = "dense"
    sparsity = _num(row.get("effective_sparsity"))
    if sparsity is None and (_num(row.get("linear_sparsity")) or 0) > 0.001:     # dense checkpoints hold a few 0s
        sparsity = _num(row.get("linear_sparsity"))
    if sparsity is None:
        sparsity = _num(row.get("level_actual")) if "level_actual" in row else _num(row.get("level"))
    return Point(name, sparsity=0.0 if name == "dense" else sparsity, bits=_num(row.get("bits_per_weight")),
                 ppl=_num(row.get("ppl")))


def _study_point(cfg: dict, task: str, path: Path) -> Point:
    """A config of the PTQ study (``bench/ptq_study.py``): its perplexity, and its accuracy on one knowledge
    category (``--task application``) or, by default (``mean``), the mean over its categories."""
    cats = cfg.get("categories", {})
    if task == "mean":
        acc, err = (mean_of_estimates([c["acc"] for c in cats.values()], [c["acc_stderr"] for c in cats.values()])
                    if cats else (None, None))
    elif task in cats:
        acc, err = cats[task]["acc"], cats[task]["acc_stderr"]
    else:
        raise DataError(f"{path} has no category {task!r}; it has: {', '.join(sorted(cats))} (or mean)")
    dense = cfg.get("method") == "dense"
    return Point("dense" if dense else cfg["variant"], sparsity=0.0 if dense else None,
                 bits=_num(cfg.get("bits_per_weight")), ppl=_num(cfg.get("ppl")), acc=acc, acc_stderr=err)


def _task_points(rows: list, meta_path: Path, task: str, path: Path) -> list[Point]:
    variants = {}
    if meta_path.is_file():
        variants = json.loads(meta_path.read_text()).get("variants", {})
    picked = [r for r in rows if r.get("task") == task]
    if not picked:
        tasks = sorted({str(r.get("task")) for r in rows})
        raise DataError(f"{path} has no rows for task {task!r}; it has: {', '.join(tasks)} (choose one with --task)")
    out = []
    for r in picked:
        v = variants.get(r["variant"], {})
        out.append(Point(r["variant"], sparsity=0.0 if r["variant"] == "dense" else _num(v.get("sparsity")),
                         bits=_num(v.get("bits_per_weight")), acc=_num(r.get("acc")),
                         acc_stderr=_num(r.get("acc_stderr"))))
    return out


def load_series(path: str | os.PathLike, task: str = "mean") -> Series:
    """The points of one results file (a sweep table or a task table, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} does not exist; pass files from bench/results/ (*.json)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a JSON results file ({e}); pass the .json a benchmark wrote, not its .csv")
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and all("ppl" in r for r in data["rows"]):
        return Series(path.stem, [_sweep_point(r) for r in data["rows"]])
    if isinstance(data, list) and data and all(isinstance(r, dict) and {"variant", "ppl"} <= r.keys() for r in data):
        return Series(path.stem, [_sweep_point(r) for r in data])          # sparsefx demo --json: the rows alone
    if isinstance(data, list) and data and all(isinstance(r, dict) and {"variant", "task", "acc"} <= r.keys()
                                               for r in data):
        return Series(path.stem, _task_points(data, path.with_name(path.stem + "_meta.json"), task, path))
    if isinstance(data, dict) and isinstance(data.get("configs"), list):
        return Series(path.stem, [_study_point(c, task, path) for c in data["configs"]])
    raise DataError(f"{path} is not a sweep table ({{'meta', 'rows'}} with a 'ppl' per row, or those rows alone as "
                    "`sparsefx demo --json` writes them), a task table (a list of {'variant', 'task', 'acc', ...} "
                    "rows) or the PTQ study ({'configs': [...]}); sparsefx plot reads the .json files that bench/*.py "
                    "write to bench/results/ and that `sparsefx demo --json` writes")


def _choose_axis(series: list[Series], x: str) -> str:
    if x != "auto":
        if x not in AXES:
            raise DataError(f"unknown x-axis {x!r}; choose one of: auto, {', '.join(AXES)}")
        return x
    def count(ax):
        return sum(getattr(p, ax) is not None and not p.dense for s in series for p in s.points)
    return max(AXES, key=count)


def plot(paths: list, out: str | os.PathLike, x: str = "auto", task: str = "mean",
         title: str | None = None) -> dict:
    """Draw ``paths``' results into ``out`` (.png, .pdf or .svg), written whole or not at all.

    Returns what was drawn: ``{"x": axis, "panels": {metric: [(label, [x...], [y...]), ...]}, "skipped": n,
    "dense": {metric: [(label, y), ...]}}``.
    """
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise DataError(f"output {out} must end in {', '.join(SUFFIXES)} (the format is taken from the suffix)")
    if not paths:
        raise DataError("sparsefx plot needs at least one results file")
    series = [load_series(p, task) for p in paths]
    axis = _choose_axis(series, x)
    metrics = [m for m in ("ppl", "acc") if any(getattr(p, m) is not None for s in series for p in s.points)]
    panels: dict[str, list] = {m: [] for m in metrics}
    dense: dict[str, list] = {m: [] for m in metrics}
    skipped = 0
    for s in series:
        fams: dict[str, list[Point]] = {}
        for p in s.points:
            if p.dense:
                for m in metrics:
                    if getattr(p, m) is not None:
                        dense[m].append((s.label, getattr(p, m), p.acc_stderr if m == "acc" else None))
                continue
            if getattr(p, axis) is None:
                skipped += 1
                continue
            fams.setdefault(family(p.variant), []).append(p)
        for fam, pts in fams.items():
            pts.sort(key=lambda p: getattr(p, axis))
            for m in metrics:
                have = [p for p in pts if getattr(p, m) is not None]
                if have:
                    panels[m].append((f"{s.label}: {fam}", [getattr(p, axis) for p in have],
                                      [getattr(p, m) for p in have],
                                      [p.acc_stderr for p in have] if m == "acc" else None,
                                      [p.variant for p in have]))
    if not any(panels[m] for m in metrics):
        raise DataError(f"no variant in {', '.join(map(str, paths))} has a value on the {axis} axis "
                        f"(try --x {'bits' if axis == 'sparsity' else 'sparsity'})")
    _draw(panels, dense, axis, out, title)
    return {"x": axis, "skipped": skipped,
            "panels": {m: [(lab, xs, ys) for lab, xs, ys, _, _ in rows] for m, rows in panels.items()},
            "dense": {m: [(lab, y) for lab, y, _ in rows] for m, rows in dense.items()}}


def _draw(panels: dict, dense: dict, axis: str, out: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")              # files only: no display is needed (or present on a server)
    import matplotlib.pyplot as plt

    names = {"ppl": "perplexity (wiki protocol, log scale)", "acc": "zero-shot accuracy"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, (m, rows) in zip(axes[0], panels.items()):
        colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        levels = {round(y, 6) for _, y, _ in dense[m]}     # files that share one dense model draw one line
        drawn: set[float] = set()
        for label, y, err in dense[m]:
            if round(y, 6) in drawn:
                continue
            drawn.add(round(y, 6))
            ax.axhline(y, color="0.3", ls="--", lw=1, label="dense" if len(levels) == 1 else f"{label}: dense")
            if err:
                ax.axhspan(y - err, y + err, color="0.3", alpha=0.1)
        for label, xs, ys, errs, variants in rows:
            c = next(colors)
            style = dict(marker="o", color=c, label=label, ls="-" if len(xs) > 1 else "none")
            if errs and any(e is not None for e in errs):
                ax.errorbar(xs, ys, yerr=[e or 0 for e in errs], capsize=3, **style)
            else:
                ax.plot(xs, ys, **style)
            if len(xs) == 1:                  # a lone point: its variant name beside it
                ax.annotate(variants[0], (xs[0], ys[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if m == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel(names[m])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=out.suffix.lower()[1:], dpi=150)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
