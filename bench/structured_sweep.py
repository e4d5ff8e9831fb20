"""Structured pruning on the embedded SmolLM2: GISP vs one-shot baselines at several levels, one run.

    python bench/structured_sweep.py                                  # protocol; all methods, 10/20/30/40 %
    python bench/structured_sweep.py --methods gisp-oneshot --normalize block --tag gisp_norm_block
    python bench/structured_sweep.py --quick                          # 4,096 eval tokens, 8 calibration samples

Each method ranks once (recipe ``level: 0``: dense weights + the ranking); the levels are then applied one after the
other to the same model (``shrink_model``), which is what "prune once, deploy many" promises: every level is a
subnetwork of the previous one. Per level: perplexity (protocol), parameters, artifact size (``save_artifact``) and,
for the first method, decode tokens/s measured at the end in interleaved rounds against the dense model.
Writes bench/results/<tag>_<model>.csv and .json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsefx.artifact import save_artifact
from sparsefx.data import PROTOCOL, calibration_batches, eval_windows
from sparsefx.eval import count_params, decode_tokens_per_s, perplexity
from sparsefx.experiments import print_table
from sparsefx.models import load_model
from sparsefx.passes.config import Recipe
from sparsefx.passes.structured import shrink_model
from sparsefx.pipeline import compress

from harness import run_meta, write_results


def variants(steps: int, normalize: str) -> dict[str, dict]:
    return {"gisp": {"method": "gisp", "steps": steps, "normalize": normalize},
            "gisp-oneshot": {"method": "gisp", "steps": 1, "normalize": normalize},
            "local-magnitude": {"method": "structured_magnitude"},
            "local-wanda": {"method": "structured_wanda"}}


def artifact_mb(model, tok, recipe) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = save_artifact(Path(d) / "a", model, tok, recipe, {})
        return round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 2)


def interleaved_decode(models: dict[str, torch.nn.Module], rounds: int) -> dict[str, float]:
    """Median decode tokens/s of each model over ``rounds`` rounds, models alternating within a round."""
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            speeds[name].append(decode_tokens_per_s(m, repeats=1))
    return {k: statistics.median(v) for k, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--methods", nargs="+", default=["gisp", "gisp-oneshot", "local-magnitude", "local-wanda"])
    ap.add_argument("--steps", type=int, default=8, help="GISP scoring rounds up to the highest level")
    ap.add_argument("--normalize", default="params", choices=["params", "block", "none"])
    ap.add_argument("--decode-rounds", type=int, default=5, help="0 skips decode speed")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="gisp")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    protocol = dataclasses.replace(PROTOCOL, eval_tokens=4096, calib_samples=8) if args.quick else PROTOCOL
    levels = sorted(args.levels)
    table = variants(args.steps, args.normalize)
    unknown = [m for m in args.methods if m not in table]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(table)}")
    stem = f"{args.tag}_{args.model}{'_quick' if args.quick else ''}"
    t_run = time.time()

    dense, tok = load_model(args.model)
    windows = eval_windows(tok, protocol)
    calib = calibration_batches(tok, protocol)
    dense_ppl = perplexity(dense, windows, progress=False)[0]
    rows = [{"method": "dense", "level": 0.0, "level_actual": 0.0, "attention_kept": None, "mlp_kept": None,
             "ppl": round(dense_ppl, 4), "ppl_vs_dense": 1.0, **count_params(dense),
             "artifact_mb": artifact_mb(dense, tok, Recipe.from_yaml("passes: [{method: gisp, sparsity: 0.0}]")),
             "compress_s": 0.0}]
    speed_models = {"dense": dense}

    def save(final: bool = False) -> None:
        meta = run_meta(protocol=dataclasses.asdict(protocol), steps=args.steps, normalize=args.normalize,
                        wall_s=round(time.time() - t_run, 1), complete=final)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        write_results(args.out, stem, [{k: r.get(k) for k in keys} for r in rows], meta)

    for mi, name in enumerate(args.methods):
        spec = {**table[name], "sparsity": levels[-1], "level": 0.0}
        recipe = Recipe.from_dict({"name": name, "passes": [spec], "calibration": {
            "samples": protocol.calib_samples, "seqlen": protocol.calib_seqlen}})
        model = copy.deepcopy(dense)
        t0 = time.time()
        result = compress(model, recipe, calibration=calib, progress=False)
        seconds = round(time.time() - t0, 1)
        details = result.reports[-1].details
        plan = model.sparsefx_structure
        for level in levels:                       # nested: each level prunes the previous model further
            info = shrink_model(model, plan, level)
            ppl = perplexity(model, windows, progress=False)[0]
            rows.append({"method": name, "level": level, "level_actual": info["level"],
                         "attention_kept": f"{info['attention_units_kept']}/{info['attention_units']}",
                         "mlp_kept": f"{info['mlp_units_kept']}/{info['mlp_units']}",
                         "ppl": round(ppl, 4), "ppl_vs_dense": round(ppl / dense_ppl, 4), **count_params(model),
                         "artifact_mb": artifact_mb(model, tok, recipe), "compress_s": seconds,
                         "peak_rss_mb": details.get("peak_rss_mb")})
            print(rows[-1], flush=True)
            if mi == 0 and args.decode_rounds:
                speed_models[f"{name}-{level:g}"] = copy.deepcopy(model)
            save()
        del model
    if args.decode_rounds:
        speeds = interleaved_decode(speed_models, args.decode_rounds)
        for r in rows:
            key = "dense" if r["method"] == "dense" else f"{r['method']}-{r['level']:g}"
            if key in speeds:
                r["decode_tok_s"] = round(speeds[key], 2)
                r["decode_vs_dense"] = round(speeds[key] / speeds["dense"], 3)
    save(final=True)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("params_nonzero", "linear_nonzero")]
    print_table([{k: r.get(k) for k in keys} for r in rows],
                f"{args.model} structured pruning ({args.tag})")
    print(f"wrote {Path(args.out) / stem}.csv/.json")


if __name__ == "__main__":
    main()
