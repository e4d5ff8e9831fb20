"""Exports of SmolLM2 artifacts, loaded back by transformers: does the served model score what the artifact scores?

    python bench/export_roundtrip.py                       # the default recipes
    python bench/export_roundtrip.py --recipes rtn-w4-g32-sym

For each recipe: compress SmolLM2 (cached in bench/.export/<recipe>/), export it to GGUF and (when every linear is
symmetric or dense, which is what transformers' compressed-tensors loader reads here) to compressed-tensors, load
each export with transformers (``gguf_file=``; the compressed-tensors folder as is), and score the protocol's
perplexity (wiki, 16,384 tokens) on the artifact and on each export. Writes bench/results/export_roundtrip.json: one
row per recipe and format with exactly the keys recipe, format, gguf_type, bits_per_weight, file_mib, exact, ppl,
ppl_artifact, rel_diff.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".export"
RESULTS = ROOT / "results"
RECIPES = ["dense", "rtn-w4-g32-sym", "gptq-w4-g32-sym", "rtn-w4-g32", "rtn-w8-g32-sym"]


def artifact(name: str) -> Path:
    from sparsefx.artifact import save_artifact
    from sparsefx.data import recipe_calibration
    from sparsefx.models import load_model
    from sparsefx.passes.config import Recipe, resolve_recipe
    from sparsefx.pipeline import compress

    folder = WORK / name
    recipe = resolve_recipe(name)
    stale = (folder / "recipe.yaml").is_file() and Recipe.load(folder / "recipe.yaml") != recipe
    if stale or not (folder / "sparsefx.json").is_file():       # compressed now, or again when the recipe changed
        model, tok = load_model("smollm2")
        result = compress(model, recipe, calibration=recipe_calibration(tok, recipe), progress=False)
        save_artifact(folder, model, tok, recipe, result.report_dict(), overwrite=True)
    return folder


def main() -> None:
    import torch
    from harness import run_meta
    from transformers import AutoModelForCausalLM

    from sparsefx._cache import atomic_write_bytes
    from sparsefx.artifact import load_artifact
    from sparsefx.data import PROTOCOL
    from sparsefx.eval import evaluate, stored_bits_per_weight
    from sparsefx.export import export_compressed_tensors, export_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    args = ap.parse_args()
    rows = []
    for name in args.recipes:
        folder = artifact(name)
        art = load_artifact(folder)
        ppl_art = evaluate(art.model, art.tokenizer, PROTOCOL, speed=False, progress=False).ppl
        quant = [m for m in art.model.modules() if getattr(m, "kind", None) == "quant_linear"]
        bpw = stored_bits_per_weight(art.model)
        out = WORK / "exports" / name
        shutil.rmtree(out, ignore_errors=True)
        g = export_gguf(folder, out / "model.gguf")
        formats = [("gguf", out, {"gguf_file": "model.gguf"}, g.file_type, all(t.exact for t in g.tensors),
                    (out / "model.gguf").stat().st_size)]
        if all(m.spec.symmetric for m in quant):
            export_compressed_tensors(folder, out / "ct")
            size = sum(p.stat().st_size for p in (out / "ct").glob("*.safetensors"))
            formats.append(("compressed-tensors", out / "ct", {}, "pack-quantized" if quant else "dense", True, size))
        for fmt, path, kw, gtype, exact, size in formats:
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
            ppl = evaluate(loaded, art.tokenizer, PROTOCOL, speed=False, progress=False).ppl
            rows.append({"recipe": name, "format": fmt, "gguf_type": gtype, "bits_per_weight": round(bpw, 4),
                         "file_mib": round(size / 2**20, 1), "exact": exact, "ppl": round(ppl, 4),
                         "ppl_artifact": round(ppl_art, 4), "rel_diff": abs(ppl - ppl_art) / ppl_art})
            print(f"{name:18s} {fmt:19s} {gtype:14s} exact={exact!s:5s} ppl {ppl:9.4f} (artifact {ppl_art:9.4f}, "
                  f"rel diff {rows[-1]['rel_diff']:.2e}) {rows[-1]['file_mib']} MiB", flush=True)
            del loaded
    RESULTS.mkdir(exist_ok=True)
    atomic_write_bytes(RESULTS / "export_roundtrip.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(RESULTS / "export_roundtrip_meta.json",
                       json.dumps(run_meta(recipes=args.recipes), indent=1).encode())


if __name__ == "__main__":
    main()
