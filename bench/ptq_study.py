"""The task-stratified PTQ study on SmolLM2: RTN / GPTQ / DAM over bits x group size x calibration samples.

    python bench/ptq_study.py                                   # the axes design (resumes: done configs are kept)
    python bench/ptq_study.py --full                            # the whole grid
    python bench/ptq_study.py --methods gptq --bits 3 4         # a slice of it
    python bench/ptq_study.py --fit                             # only fit the law to what is there, and plot

Several processes may share the results file (each with its own slice, e.g. ``--methods gptq`` beside
``--methods dam`` with OMP_NUM_THREADS=1 on a 2-core machine): each reads it again before it writes.

Grid: bits {2, 3, 4, 8} x group size {32, 64, 192} x calibration samples {8, 32, 128} (c4, 512 tokens each) for
GPTQ and DAM; RTN uses no calibration data, so it has one config per (bits, group): 84 configs, ~11 h on 2 CPU
cores. By default the study runs the axes through 3-bit, group 64, 32 samples instead (each factor over all its
values, the others held: 22 configs), enough to fit each factor's exponent; ``--full`` runs the product. Group 128, the paper's coarse
end, does not divide SmolLM2's hidden size (576), so 192 (= 576 / 3) takes its place. All three store the same bits
per weight at a given (bits, group): GPTQ and RTN asymmetric (an fp16 scale and a uint8 zero per group), DAM a
symmetric main weight whose saved zero bits buy its 4-bit low-rank factors (the ``dam-3.375`` recipe's recipe).

Each config is compressed, then scored: perplexity under the protocol and zero-shot accuracy on a seeded subset
(``--limit`` examples per task, ``--mmlu-limit`` per MMLU subject) of every task of the three knowledge categories
(``sparsefx.tasks``: application = ARC-e, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA, SciQ; reasoning = ARC-c,
LAMBADA, MMLU STEM; memorization = TriviaQA, NQ-open, MMLU's other subjects). A category's accuracy is the mean
over its tasks (MMLU pooled per category). Then ``sparsefx.tasks.law`` fits the law per method and category.

Writes bench/results/tasks_ptq_smollm2.json: {"meta", "configs": [one per config: variant, method, bits,
group_size, calib_samples, bits_per_weight, ppl, compress_s, eval_s, tasks {task: acc, acc_stderr, n},
categories {category: acc, acc_stderr, chance, n}]}, "fits": [per method and category: the law's parameters, R²,
RMSE, ci95 (95 % intervals of the exponents by a parametric bootstrap over the accuracies' standard errors)]};
and bench/results/tasks_ptq_smollm2.png (accuracy per category against bits, the fits drawn through).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TAG = "tasks_ptq_smollm2"
METHODS = ("rtn", "gptq", "dam")
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 192)
CALIB = (8, 32, 128)
SUITE = ["arc_easy", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "sciq", "arc_challenge", "lambada",
         "mmlu", "triviaqa", "nq_open"]
CATEGORIES = ("application", "reasoning", "memorization")


def variant(method: str, bits: int, group: int, calib: int | None) -> str:
    return f"{method}-w{bits}-g{group}" + (f"-c{calib}" if calib else "")


def recipe_for(method: str, bits: int, group: int, calib: int | None):
    """The recipe of one config. DAM's budget is the asymmetric format's bits per weight at (bits, group)."""
    from sparsefx.passes.config import Recipe

    cal = {"text": "c4", "samples": calib or 32, "seqlen": 512, "batch_size": 4}
    if method == "dam":
        p = {"method": "dam", "budget": bits + 24 / group, "bits": bits, "group_size": group, "symmetric": True,
             "factor_bits": 4, "factor_group": 64}
    else:
        p = {"method": method, "bits": bits, "group_size": group}
        if method == "gptq":
            p["precision"] = "float32"
    return Recipe.from_dict({"name": variant(method, bits, group, calib), "calibration": cal, "passes": [p]})


CENTER = (3, 64, 32)          # bits, group, calibration samples: where the axes design crosses


def grid(methods, bits, groups, calib, full: bool = False) -> list[tuple]:
    """The configs to run: the full product, or (default) the axes through ``CENTER``: every bit width at the
    center's group and calibration, every group at its bits and calibration, every calibration size at its bits and
    group — each factor varied over all its values with the others held, 22 configs instead of 84."""
    out = []
    for m, b, g in itertools.product(methods, bits, groups):
        for c in ([None] if m == "rtn" else calib):
            on_axis = sum(v != cv for v, cv in zip((b, g, c if c is not None else CENTER[2]), CENTER)) <= 1
            if full or on_axis:
                out.append((m, b, g, c))
    return out


def run_config(cfg, limit: int, mmlu_limit: int, progress: bool) -> dict:
    from sparsefx import tasks as T
    from sparsefx.codegen.cpu import prepare_cpu_decode
    from sparsefx.data import PROTOCOL, recipe_calibration
    from sparsefx.eval import evaluate
    from sparsefx.models import load_model
    from sparsefx.pipeline import compress

    method, bits, group, calib = cfg
    model, tok = load_model("smollm2")
    t0 = time.perf_counter()
    bpw = None
    if method != "dense":
        recipe = recipe_for(*cfg)
        result = compress(model, recipe, calibration=recipe_calibration(tok, recipe), progress=progress)
        bpw = result.reported("bits_per_weight")
    compress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = evaluate(model, tok, PROTOCOL, speed=False, progress=progress).ppl
    prepare_cpu_decode(model)
    results = []
    for task in SUITE:
        results.extend(T.evaluate_tasks(model, tok, task, limit=mmlu_limit if task == "mmlu" else limit,
                                        progress=progress))
    eval_s = time.perf_counter() - t0
    tasks = {r["task"]: {"acc": round(r["acc"], 6), "acc_stderr": round(r["acc_stderr"], 6), "n": r["n"]}
             for r in T.summary_rows(results) if r["task"] != "mean"}
    cats = {r["category"]: {k: (round(r[k], 6) if isinstance(r[k], float) else r[k])
                            for k in ("acc", "acc_stderr", "chance", "n", "tasks")} for r in T.category_rows(results)}
    return {"variant": "dense" if method == "dense" else variant(*cfg), "method": method, "bits": bits,
            "group_size": group, "calib_samples": calib, "bits_per_weight": None if bpw is None else round(bpw, 4),
            "ppl": round(ppl, 4), "compress_s": round(compress_s, 1), "eval_s": round(eval_s, 1), "tasks": tasks,
            "categories": cats}


def fit_all(configs: list[dict]) -> list[dict]:
    """The law per method and category, fitted to that method's configs (dense: the reference)."""
    from sparsefx.errors import DataError
    from sparsefx.tasks.law import Point, bootstrap_exponents, fit_law

    dense = next((c for c in configs if c["method"] == "dense"), None)
    if dense is None:
        return []
    fits = []
    for method in METHODS:
        rows = [c for c in configs if c["method"] == method]
        for cat in CATEGORIES:
            pts = [Point(c["bits"], c["group_size"], c["calib_samples"], c["categories"][cat]["acc"])
                   for c in rows if cat in c["categories"]]
            d = dense["categories"].get(cat)
            if not d:
                continue
            try:
                fit = fit_law(pts, dense=d["acc"], chance=d["chance"])
            except DataError as e:
                fits.append({"method": method, "category": cat, "error": str(e), "n": len(pts)})
                continue
            ses = [c["categories"][cat]["acc_stderr"] for c in rows if cat in c["categories"]]
            ci = bootstrap_exponents(pts, ses, d["acc"], d["acc_stderr"], d["chance"])
            fits.append({"method": method, "category": cat, **fit.row(), "ci95": {k: list(v) for k, v in ci.items()}})
    return fits


def write(configs: list[dict], meta: dict, tag: str) -> None:
    from sparsefx._cache import atomic_write_bytes

    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "configs": configs, "fits": fit_all(configs)}
    atomic_write_bytes(RESULTS / f"{tag}.json", json.dumps(data, indent=1).encode())
    if data["fits"]:
        plot_study(data, RESULTS / f"{tag}.png")


def plot_study(data: dict, out: Path) -> None:
    """Accuracy per category against bits (one panel per category; group 64, calibration 32 where it applies),
    the fitted law drawn through; dense and chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsefx.tasks.law import LawFit

    configs, fits = data["configs"], data["fits"]
    dense = next(c for c in configs if c["method"] == "dense")
    fig, axes = plt.subplots(1, len(CATEGORIES), figsize=(15, 4.5), squeeze=False)
    for ax, cat in zip(axes[0], CATEGORIES):
        d = dense["categories"].get(cat)
        if d:
            ax.axhline(d["acc"], color="0.3", ls="--", lw=1, label="dense")
            ax.axhline(d["chance"], color="0.6", ls=":", lw=1, label="chance")
        for method, color in zip(METHODS, ("C0", "C1", "C2")):
            pts = sorted((c for c in configs if c["method"] == method and c["group_size"] == 64
                          and c["calib_samples"] in (None, 32) and cat in c["categories"]), key=lambda c: c["bits"])
            if pts:
                ax.errorbar([c["bits"] for c in pts], [c["categories"][cat]["acc"] for c in pts],
                            yerr=[c["categories"][cat]["acc_stderr"] for c in pts], fmt="o", color=color,
                            capsize=3, label=f"{method} (g64{', c32' if method != 'rtn' else ''})")
            f = next((f for f in fits if f["method"] == method and f["category"] == cat and "error" not in f), None)
            if f:
                law = LawFit(**{k: f[k] for k in LawFit.__dataclass_fields__})
                xs = [2 + i * 6 / 60 for i in range(61)]
                ax.plot(xs, [law.predict(x, 64, 32) for x in xs], color=color, lw=1,
                        label=f"{method} law: R² {f['r2']:.2f}")
        ax.set_title(cat)
        ax.set_xlabel("bits")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)


def read_configs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["configs"] if path.is_file() else []


def main() -> None:
    from harness import run_meta

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    ap.add_argument("--groups", nargs="+", type=int, default=list(GROUPS))
    ap.add_argument("--calib", nargs="+", type=int, default=list(CALIB))
    ap.add_argument("--limit", type=int, default=100, help="examples per task (seeded subset)")
    ap.add_argument("--mmlu-limit", type=int, default=5, help="examples per MMLU subject")
    ap.add_argument("--full", action="store_true",
                    help="the full grid (84 configs, ~11 h here) instead of the axes through 3-bit g64 c32 (22)")
    ap.add_argument("--redo", action="store_true", help="run configs that are already in the results again")
    ap.add_argument("--fit", action="store_true", help="only fit and plot what the results file holds")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--tag", default=TAG, help="results file name (a smoke run: another tag)")
    args = ap.parse_args()
    path = RESULTS / f"{args.tag}.json"
    old = json.loads(path.read_text()) if path.is_file() else {"configs": []}
    configs = old["configs"]
    meta = {**old.get("meta", {}), **run_meta(limit=args.limit, mmlu_limit=args.mmlu_limit, tasks=SUITE)}
    if old.get("meta") and (old["meta"]["limit"], old["meta"]["mmlu_limit"]) != (args.limit, args.mmlu_limit):
        raise SystemExit(f"{path} was made with --limit {old['meta']['limit']} --mmlu-limit "
                         f"{old['meta']['mmlu_limit']}; use the same (or move the file away to start over)")
    if args.fit:
        write(configs, meta, args.tag)
        return
    todo = [("dense", None, None, None)] + grid(args.methods, args.bits, args.groups, args.calib, args.full)
    for cfg in todo:
        name = "dense" if cfg[0] == "dense" else variant(*cfg)
        if any(c["variant"] == name for c in configs) and not args.redo:
            continue
        if any(c["variant"] == name for c in read_configs(path)) and not args.redo:
            continue                    # another process of the study did it meanwhile
        row = run_config(cfg, args.limit, args.mmlu_limit, args.progress)
        # read again just before writing: several processes of the study may share the file (each takes its slice
        # with --methods/--bits/...), and each keeps the others' rows
        configs = [c for c in read_configs(path) if c["variant"] != name] + [row]
        write(configs, meta, args.tag)
        cats = "  ".join(f"{k} {100 * v['acc']:.1f}" for k, v in row["categories"].items())
        print(f"{name:22s} ppl {row['ppl']:10.2f}  {cats}  ({row['compress_s']:.0f} + {row['eval_s']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
