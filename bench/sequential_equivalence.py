"""Sequential vs whole-model compression of the embedded SmolLM2: perplexity under the protocol, one run.

    python bench/sequential_equivalence.py
    python bench/sequential_equivalence.py --recipes wanda-50 gptq-w4-g64

Per recipe: the whole-model run (in memory), and the sequential pipeline from the checkpoint's files
(``compress_checkpoint``, artifact written, then loaded) twice — calibrating each block on the outputs of the
already compressed blocks (``compressed``, the default) and on the dense model's hidden states (``dense``, what the
whole-model run sees). Writes bench/results/sequential_equivalence_smollm2.csv/.json with the perplexity of each
run and its ratio to the whole-model run of the same recipe.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT = ["magnitude-50", "wanda-50", "daws-50-mt3-banded", "gptq-w4-g64", "dam-3.375"]


def main() -> None:
    import dataclasses

    from harness import run_meta, write_results
    from transformers.utils import logging as hf_logging

    from sparsefx.artifact import load_artifact
    from sparsefx.data import PROTOCOL, eval_windows, recipe_calibration
    from sparsefx.eval import perplexity
    from sparsefx.models import embedded_model_path, load_model
    from sparsefx.passes.config import resolve_recipe
    from sparsefx.pipeline import compress
    from sparsefx.sequential.pipeline import compress_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--tag", default="sequential_equivalence")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    t_all = time.time()
    folder = embedded_model_path("smollm2")
    _, tok = load_model(folder)
    windows = eval_windows(tok, PROTOCOL)
    rows: list[dict] = []
    for name in args.recipes:
        recipe = resolve_recipe(name)
        calib = recipe_calibration(tok, recipe)
        label = recipe.name or Path(name).stem
        model, _ = load_model(folder)
        t0 = time.perf_counter()
        compress(model, recipe, calibration=calib, progress=False)
        seconds = time.perf_counter() - t0
        whole = perplexity(model, windows, progress=False)[0]
        del model
        rows.append({"recipe": label, "mode": "whole", "calib_inputs": "dense" if calib is not None else "none",
                     "ppl": round(whole, 4), "vs_whole": 1.0, "compress_seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
        # without calibration both input modes are the same run
        for inputs in ("compressed", "dense") if calib is not None else ("compressed",):
            out = Path(tempfile.mkdtemp(prefix="seq-eq-")) / "artifact"
            t0 = time.perf_counter()
            compress_checkpoint(folder, recipe, out, calib, tok, inputs=inputs, progress=False)
            seconds = time.perf_counter() - t0
            ppl = perplexity(load_artifact(out).model, windows, progress=False)[0]
            shutil.rmtree(out.parent, ignore_errors=True)
            rows.append({"recipe": label, "mode": "sequential",
                         "calib_inputs": inputs if calib is not None else "none", "ppl": round(ppl, 4),
                         "vs_whole": round(ppl / whole, 5), "compress_seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
        write_results(ROOT / "results", f"{args.tag}_smollm2", rows,
                      run_meta(protocol=dataclasses.asdict(PROTOCOL), wall_s=round(time.time() - t_all, 1)))
    print(f"wrote {ROOT / 'results' / args.tag}_smollm2.csv/.json")


if __name__ == "__main__":
    main()
