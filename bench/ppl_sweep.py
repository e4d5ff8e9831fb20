"""Perplexity sweep on the embedded SmolLM2 under the protocol of DEVELOPERS.md, all variants in one run.

    python bench/ppl_sweep.py                       # weight masks (tag "masks"), full protocol
    python bench/ppl_sweep.py --tag daws --no-speed --recipes teal-40 daws-40 teal-50 daws-50 teal-60 daws-60
    python bench/ppl_sweep.py --quick               # 4,096 eval tokens, 8 calibration samples

Writes bench/results/<tag>_<model>.csv and .json (rows + machine + command). The dense row is always first.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


from sparsefx.data import PROTOCOL
from sparsefx.experiments import print_table, sweep
from sparsefx.passes.config import resolve_recipe

from harness import run_meta, write_results

MASK_RECIPES = ["dense", "magnitude-50", "wanda-50", "magnitude-2of4", "wanda-2of4", "wanda-4of8", "wanda-50-attn30"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recipes", nargs="*", default=MASK_RECIPES, help="built-in recipe names or YAML files")
    ap.add_argument("--tag", default="masks", help="results file prefix")
    ap.add_argument("--no-speed", action="store_true", help="skip decode tokens/s")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    protocol = dataclasses.replace(PROTOCOL, eval_tokens=4096) if args.quick else PROTOCOL
    t0 = time.time()
    out = Path(args.out)
    stem = f"{args.tag}_{args.model}{'_quick' if args.quick else ''}"

    def save(rows: list[dict], final: bool = False) -> None:
        # The "dense" recipe (0% sparsity) runs the whole pipeline; its row is named dense-recipe to tell it apart.
        for r in rows[1:]:
            if r["variant"] == "dense":
                r["variant"] = "dense-recipe(0%)"
        meta = run_meta(protocol=dataclasses.asdict(protocol), wall_s=round(time.time() - t0, 1), complete=final)
        write_results(out, stem, rows, meta)

    recipes = [resolve_recipe(r) for r in args.recipes]
    rows = sweep(args.model, recipes, protocol, speed=not args.no_speed, progress=False,
                 calib_samples=8 if args.quick else None, on_row=save)
    save(rows, final=True)
    print_table(rows, f"{args.model} {args.tag}")
    print(f"wrote {out / stem}.csv/.json")


if __name__ == "__main__":
    main()
