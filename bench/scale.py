"""Compressing models larger than memory: peak RSS, time and artifact size from 0.1 B to the 7 B Llama-2 shape.

    python bench/scale.py                                  # every shape, both recipes, whole where it fits
    python bench/scale.py --models 0.1B 1.1B --recipes wanda-50     # updates those rows of the table

For each shape the bench writes a Llama checkpoint with random bf16 weights itself, one shard at a time (the
whole model is never in memory): ``bench/.scale/<model>/``. Each run is a fresh process (``--child``) that
compresses it with the Python API — whole-model (load, ``compress``, ``save_artifact``) where the whole-model
estimate fits this machine, sequential (``compress_checkpoint``) always — and reports its own peak RSS (max RSS
of the process, from ``getrusage``). Calibration: c4 tokenized with SmolLM2's tokenizer, ids taken modulo the
shape's vocabulary (the weights are random, so only the amount of data matters), 32 x 512 tokens below 3 B and
8 x 512 from 3 B on. Recipes: ``wanda-50`` and GPTQ 4-bit group 128 as the built-in ``gptq-w4-g128`` (factored
in float32, as GPTQ's reference code does).

Writes bench/results/scale.json and .csv, one row per run with exactly the keys: model, params, checkpoint_bytes,
recipe, mode, peak_rss_bytes, seconds, artifact_bytes, ok. (On a GPU ``--device cuda`` runs the same; the peak CUDA
memory is printed, not stored, so the rows keep their keys.)
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".scale"
RESULTS = ROOT / "results"
KEYS = ("model", "params", "checkpoint_bytes", "recipe", "mode", "peak_rss_bytes", "seconds", "artifact_bytes", "ok")

# Llama shapes: 0.1 B (small), 1.1 B (TinyLlama's, with SmolLM2's vocabulary), 3 B (Llama-3.2-3B: tied, 128 k
# vocabulary), 7 B (Llama-2-7B)
SHAPES = {
    "0.1B": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "3B": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
RECIPES = {
    "wanda-50": "name: wanda-50\npasses: [{method: wanda, sparsity: 0.5}]\n",
    "gptq-w4-g128": "name: gptq-w4-g128\npasses: [{method: gptq, bits: 4, group_size: 128, precision: float32}]\n",
}


def make_checkpoint(name: str, folder: Path) -> None:
    """A Llama checkpoint of shape ``name`` with random bf16 weights (std 0.02, norms 1), written shard by shard."""
    import torch
    from transformers import AutoConfig

    from sparsefx.models import empty_model
    from sparsefx.shards import ShardWriter

    if (folder / "config.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model("llama", max_position_embeddings=4096, **SHAPES[name])
    config.dtype = torch.bfloat16
    skeleton = empty_model(config, torch.bfloat16)
    writer = ShardWriter(tmp, "model", 2 * 2**30)
    gen = torch.Generator().manual_seed(0)
    for key, t in skeleton.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if t.dim() == 1:
            writer.add(key, torch.ones(t.shape, dtype=torch.bfloat16))
        else:
            writer.add(key, (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.finish()
    config.save_pretrained(tmp)
    tmp.rename(folder)


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def params_of(folder: Path) -> int:
    from sparsefx.shards import TensorStore

    store = TensorStore(folder)
    total = 0
    for k in store.keys():
        n = 1
        for s in store.shape(k):
            n *= s
        total += n
    return total


def calibration(vocab: int, samples: int):
    import dataclasses

    from transformers import AutoTokenizer

    from sparsefx.data import PROTOCOL, calibration_batches
    from sparsefx.models import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path("smollm2"))
    p = dataclasses.replace(PROTOCOL, calib_samples=samples)
    return calibration_batches(tok, p) % vocab


def child(args) -> None:
    """One compression in this process; prints a JSON line with its seconds and peak RSS."""
    import torch

    from sparsefx.passes.config import Recipe

    folder = Path(args.child)
    out = WORK / "out" / f"{folder.name}-{args.recipe}-{args.mode}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = Recipe.from_yaml(RECIPES[args.recipe])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    ids = calibration(config.vocab_size, args.samples)
    t0 = time.perf_counter()
    if args.mode == "whole":
        from transformers import AutoModelForCausalLM

        from sparsefx.artifact import checkpoint_dtypes, save_artifact
        from sparsefx.pipeline import compress

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)
        result = compress(model, recipe, calibration=ids, progress=False)
        save_artifact(out, model, None, recipe, result.report_dict(), stats=result.stats,
                      dtypes=checkpoint_dtypes(folder))
    else:
        from sparsefx.sequential.pipeline import compress_checkpoint

        compress_checkpoint(folder, recipe, out, ids, None, device=args.device, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    check_complete(out, folder)
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_bytes": peak, "artifact_bytes": dir_bytes(out),
                      "peak_cuda_bytes": cuda}))
    shutil.rmtree(out, ignore_errors=True)


def check_complete(out: Path, folder: Path) -> None:
    """Every tensor of the checkpoint is in the artifact: dense (in its checkpoint dtype), or as the state of a
    compressed module (read from the headers; a 7 B artifact is not loaded whole here)."""
    from sparsefx.shards import TensorStore

    src, dense = TensorStore(folder), TensorStore(out, "model", "artifact")
    plan = json.loads((out / "compressed.json").read_text()) if (out / "compressed.json").is_file() else {}
    for name in src.keys():
        if name in dense:
            if dense.dtype(name) != src.dtype(name):
                raise SystemExit(f"{name}: stored as {dense.dtype(name)}, the checkpoint has {src.dtype(name)}")
        elif name.rpartition(".")[0] not in plan:
            raise SystemExit(f"the artifact lacks {name}")


def whole_fits(folder: Path, recipe: str, samples: int) -> bool:
    import psutil
    from transformers import AutoConfig

    from sparsefx.passes.config import Recipe
    from sparsefx.sequential import memory

    shape = memory.Shape.from_config(AutoConfig.from_pretrained(folder))
    est = memory.estimate(shape, Recipe.from_yaml(RECIPES[recipe]), samples, 512, "whole")
    return est.total <= 0.8 * psutil.virtual_memory().total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--modes", nargs="+", default=["whole", "sequential"], choices=["whole", "sequential"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints (bench/.scale/)")
    ap.add_argument("--tag", default="", help="results file suffix")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    RESULTS.mkdir(exist_ok=True)
    name = f"scale{'_' + args.tag if args.tag else ''}"
    rows: list[dict] = []          # this invocation's rows; _write merges them into the table
    for model in args.models:
        folder = WORK / model
        t0 = time.perf_counter()
        make_checkpoint(model, folder)
        print(f"{model}: checkpoint {dir_bytes(folder) / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        params, ckpt = params_of(folder), dir_bytes(folder)
        samples = 32 if params < 2.5e9 else 8
        for recipe in args.recipes:
            for mode in args.modes:
                if mode == "whole" and not whole_fits(folder, recipe, samples):
                    print(f"  {recipe:14s} whole: does not fit this machine (estimate), skipped", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--child", str(folder), "--recipe", recipe, "--mode", mode,
                       "--samples", str(samples), "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                row = {"model": model, "params": params, "checkpoint_bytes": ckpt, "recipe": recipe, "mode": mode,
                       "peak_rss_bytes": None, "seconds": None, "artifact_bytes": None, "ok": proc.returncode == 0}
                if proc.returncode == 0:
                    got = json.loads(proc.stdout.strip().splitlines()[-1])
                    row.update({k: got[k] for k in ("seconds", "peak_rss_bytes", "artifact_bytes")})
                    cuda = f", peak CUDA {got['peak_cuda_bytes'] / 2**30:.2f} GiB" if got["peak_cuda_bytes"] else ""
                    print(f"  {recipe:14s} {mode:10s} {row['seconds']:8.1f} s  peak RSS "
                          f"{row['peak_rss_bytes'] / 2**30:.2f} GiB ({row['peak_rss_bytes'] / ckpt:.2f}x checkpoint)"
                          f"  artifact {row['artifact_bytes'] / ckpt:.3f}x{cuda}", flush=True)
                else:
                    print(f"  {recipe:14s} {mode:10s} FAILED:\n{proc.stderr[-2000:]}", flush=True)
                rows.append({k: row[k] for k in KEYS})
                _write(rows, name)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    _write(rows, name)


def _write(rows: list[dict], name: str) -> None:
    """Merge ``rows`` into the table: a row replaces the stored row of its (model, recipe, mode), every other row
    stays (runs of some shapes or recipes update their rows of the one table; the file is re-read at each write,
    so two invocations running side by side keep each other's rows)."""
    path = RESULTS / f"{name}.json"
    key = lambda r: (r["model"], r["recipe"], r["mode"])      # noqa: E731
    mine = {key(r) for r in rows}
    kept = [r for r in json.loads(path.read_text()) if key(r) not in mine] if path.is_file() else []
    order = list(SHAPES)
    rows = sorted(kept + rows, key=lambda r: (order.index(r["model"]), r["recipe"], r["mode"] != "whole"))
    path.write_text(json.dumps(rows, indent=1))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KEYS)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
