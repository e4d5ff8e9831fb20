"""Zero-shot task accuracy of SmolLM2 and its compressed variants, one run.

    python bench/task_sweep.py                                   # every variant, the default suite, --limit 500
    python bench/task_sweep.py --variants dense daws-50-mt3-banded --limit 200
    python bench/task_sweep.py --markdown                        # the committed results as the docs table

Each variant is a built-in recipe (``name@level`` for a level of a nested GISP artifact), compressed once into
``bench/.tasks/<recipe>/`` (reused by later runs; ``--recompress`` rebuilds) and loaded with ``sparsefx.load`` as a
user would, then scored by ``sparsefx.tasks`` on the same seeded subset of every task (``--limit`` examples per
task, ``--mmlu-limit`` per MMLU subject; seed 1234). Writes:

    bench/results/tasks_smollm2.json        a list of rows with exactly the keys variant, task, acc, acc_stderr, n:
                                            one per variant and task (mmlu: its subjects pooled), plus one per
                                            variant with task "mean" (the unweighted mean over the tasks)
    bench/results/tasks_smollm2_meta.json   the command, limits, and per variant: seconds, acc_norm where a task
                                            has it, sparsity and bits per weight (the x-axes of sparsefx plot),
                                            and each example's 0/1 score ("correct", for paired comparisons)
    bench/results/tasks_smollm2.csv         the same rows as CSV

Rows of variants not run this time are kept from the file (merged by variant).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".tasks"
RESULTS = ROOT / "results"
KEYS = ("variant", "task", "acc", "acc_stderr", "n")
VARIANTS = ["dense", "wanda-50", "teal-50", "daws-50-mt3-banded", "gisp-nested-40@0.2", "gisp-nested-40@0.3",
            "gptq-w4-g64", "rtn-w3-g64-head8", "dam-3.375"]
SUITE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu", "triviaqa",
         "nq_open"]


def build(variant: str, recompress: bool) -> tuple[Path, float | None, float]:
    """The artifact folder of ``variant`` (compressed now unless cached), its level, and the seconds it took."""
    from sparsefx.artifact import save_artifact
    from sparsefx.data import recipe_calibration
    from sparsefx.models import load_model
    from sparsefx.passes.config import resolve_recipe
    from sparsefx.pipeline import compress

    name, _, level = variant.partition("@")
    folder = WORK / name
    if recompress:
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    if not (folder / "sparsefx.json").is_file():
        recipe = resolve_recipe(name)
        model, tok = load_model("smollm2")
        result = compress(model, recipe, calibration=recipe_calibration(tok, recipe), progress=False)
        save_artifact(folder, model, tok, recipe, result.report_dict(), stats=result.stats, overwrite=True)
    return folder, float(level) if level else None, time.perf_counter() - t0


def compression_of(folder: Path, level: float | None) -> dict:
    """Where a variant sits for ``sparsefx plot``: the sparsity its passes report (activation sparsity as the
    share of multiply-adds skipped, else zeroed weights; a GISP level as its level) and bits per weight."""
    from sparsefx.pipeline import last_reported

    details = [p.get("details", {}) for p in json.loads((folder / "report.json").read_text())["passes"]]
    sparsity = last_reported(details, "effective_sparsity") or last_reported(details, "sparsity")
    # bits per weight of the decoder layers' linears: the first pass that reports it (a recipe quantizes the layers
    # first; a later pass on the LM head alone, as in rtn-w3-g64-head8, would report the head's 8.375)
    bits = next((d["bits_per_weight"] for d in details if d.get("bits_per_weight") is not None), None)
    return {"sparsity": level if level is not None else sparsity, "bits_per_weight": bits}


def write(rows: list[dict], meta: dict, tag: str) -> None:
    from sparsefx._cache import atomic_write_bytes

    RESULTS.mkdir(exist_ok=True)
    atomic_write_bytes(RESULTS / f"{tag}.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(RESULTS / f"{tag}_meta.json", json.dumps(meta, indent=1).encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=KEYS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(RESULTS / f"{tag}.csv", buf.getvalue().encode())


def paired_share(correct: dict | None, dense: dict | None) -> tuple[float, float] | None:
    """A variant's mean accuracy as a share of dense's, and its standard error from the paired per-example
    differences (both score the same seeded examples, so the difference is far tighter than either mean): per task
    the mean of ``variant - dense`` over its examples, then the unweighted mean over tasks, as ``summary_rows``
    averages accuracy. None without both variants' per-example scores on the same tasks."""
    from sparsefx.stats import mean_of_estimates, mean_stderr

    if not correct or not dense or correct.keys() != dense.keys():
        return None
    diffs, errs, base = [], [], []
    for task, s in correct.items():
        d = [int(a) - int(b) for a, b in zip(s, dense[task], strict=True)]
        diffs.append(sum(d) / len(d))
        errs.append(mean_stderr(d))
        base.append(dense[task].count("1") / len(d))
    diff, err = mean_of_estimates(diffs, errs)
    dense_mean = sum(base) / len(base)
    return 1 + diff / dense_mean, err / dense_mean


def markdown(rows: list[dict], meta: dict) -> str:
    """The docs table: one line per variant, accuracy (%) ± stderr per task, the mean, and the mean as a share of
    dense's: ± its paired standard error where the per-example scores are recorded (``paired_share``), else the
    two means taken as independent (conservative: the same examples are scored by both, so their errors are
    positively correlated)."""
    tasks = [t for t in dict.fromkeys(r["task"] for r in rows) if t != "mean"] + ["mean"]
    cell = {(r["variant"], r["task"]): r for r in rows}
    dense = cell.get(("dense", "mean"))
    lines = ["| variant | " + " | ".join(tasks) + " | mean / dense | bits/w | sparsity |",
             "|---|" + "---:|" * (len(tasks) + 3)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        accs = [f"{100 * cell[v, t]['acc']:.1f} ± {100 * cell[v, t]['acc_stderr']:.1f}" if (v, t) in cell else ""
                for t in tasks]
        c = meta.get("variants", {}).get(v, {})
        m = cell.get((v, "mean"))
        share = ""
        if v == "dense" and m:
            share = "100 %"
        elif dense and m:
            paired = paired_share(c.get("correct"), meta.get("variants", {}).get("dense", {}).get("correct"))
            if paired:
                ratio, se = paired
            else:
                ratio = m["acc"] / dense["acc"]
                se = ratio * ((m["acc_stderr"] / m["acc"]) ** 2 + (dense["acc_stderr"] / dense["acc"]) ** 2) ** 0.5
            share = f"{100 * ratio:.1f} % ± {100 * se:.1f}"
        bits = f"{c['bits_per_weight']:.3f}" if c.get("bits_per_weight") else "—"
        sp = f"{c['sparsity']:.2f}" if c.get("sparsity") else "—"
        lines.append(f"| {v} | " + " | ".join(accs) + f" | {share} | {bits} | {sp} |")
    n = {t: cell[rows[0]["variant"], t]["n"] for t in tasks if t != "mean" and (rows[0]["variant"], t) in cell}
    lines.append("")
    lines.append("Examples per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) +
                 f" (seeded subsets: --limit {meta.get('limit')}, --mmlu-limit {meta.get('mmlu_limit')} per subject).")
    return "\n".join(lines)


def main() -> None:
    from harness import run_meta

    from sparsefx import tasks as T
    from sparsefx.artifact import load_artifact
    from sparsefx.codegen.cpu import prepare_cpu_decode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--tasks", nargs="+", default=SUITE)
    ap.add_argument("--limit", type=int, default=500, help="examples per task (seeded subset)")
    ap.add_argument("--mmlu-limit", type=int, default=50, help="examples per MMLU subject")
    ap.add_argument("--recompress", action="store_true")
    ap.add_argument("--tag", default="tasks_smollm2")
    ap.add_argument("--markdown", action="store_true", help="print the results file as the docs table; run nothing")
    args = ap.parse_args()
    path = RESULTS / f"{args.tag}.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    meta_path = RESULTS / f"{args.tag}_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"variants": {}}
    if args.markdown:
        if not rows:
            raise SystemExit(f"{path} holds no results; run the sweep first (python bench/task_sweep.py)")
        print(markdown(rows, meta))
        return
    meta.update(run_meta(limit=args.limit, mmlu_limit=args.mmlu_limit, seed=T.SEED, tasks=args.tasks))
    for variant in args.variants:
        folder, level, build_s = build(variant, args.recompress)
        art = load_artifact(folder, level=level)
        model, tok = art.model, art.tokenizer
        prepare_cpu_decode(model)                  # as sparsefx.load does: one-token steps on the CPU kernels
        t0 = time.perf_counter()
        results = []
        for task in args.tasks:
            limit = args.mmlu_limit if task == "mmlu" else args.limit
            results.extend(T.evaluate_tasks(model, tok, task, limit=limit, progress=True))
        eval_s = time.perf_counter() - t0
        summary = T.summary_rows(results)
        shown = {r["task"] for r in summary}
        new = [{"variant": variant, "task": r["task"], "acc": round(r["acc"], 6),
                "acc_stderr": round(r["acc_stderr"], 6), "n": r["n"]} for r in summary]
        rows = [r for r in rows if r["variant"] != variant] + new
        meta["variants"][variant] = {
            **compression_of(folder, level),
            "compress_seconds": round(build_s, 1), "eval_seconds": round(eval_s, 1),
            "acc_norm": {r["task"]: round(r["acc_norm"], 6) for r in summary if "acc_norm" in r},
            # per example, 1 = right (acc or exact match), in the seeded order: for paired comparisons
            "correct": {r.task: "".join("1" if x else "0" for x in r.scores[r.primary])
                        for r in results if r.task in shown}}
        order = {v: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda r: order.get(r["variant"], len(order)))
        write(rows, meta, args.tag)
        mean = new[-1]
        print(f"{variant:24s} mean acc {100 * mean['acc']:.2f} ± {100 * mean['acc_stderr']:.2f}  "
              f"({mean['n']} examples, {eval_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
