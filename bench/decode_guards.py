"""Compiled batch-1 decode on CPU with Dynamo's default guards vs with its guards on nn.Module attributes left out.

    python bench/decode_guards.py out/rtn3-head8 out/banded-head8 --rounds 3
    python bench/decode_guards.py out/rtn3-head8 --int8-activations --tag q8

Before every call of a compiled function, Dynamo checks the guards of its cached entries; for an HF model they
include the attributes of every module. ``options={"guard_filter_fn":
torch.compiler.skip_guard_on_all_nn_modules_unsafe}`` leaves those out. That is only sound with one compiled model
per process: all HF models enter Dynamo through the same code, and an entry without module guards matches any of
their calls (an RTN-3 model's entry ran for an RTN-4 model and failed on its missing ``qweight_packed``, in a
check while writing this bench). So each measurement here is a fresh process (``--child``) that loads one artifact,
compiles it with the ``sparsefx`` backend in one of the two modes and times greedy decode with the lean loop of
``decode_e2e.py``, interleaved with the eager dense model (never compiled) in the same process. Rounds alternate the
modes, so machine drift hits both. Rows: median tokens/s over rounds, the ratio to the eager dense model of the same
processes, and the filtered mode over the default one. Writes bench/results/decode_guards[_TAG]_<model>.csv/.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODES = {"default": None, "no-module-guards": "skip_guard_on_all_nn_modules_unsafe"}


def child(args) -> None:
    import torch
    from decode_e2e import decode_tok_s

    from sparsefx.artifact import load_artifact
    from sparsefx.codegen.cpu import prepare_cpu_decode
    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.models import load_model

    art = load_artifact(args.child)
    prepare_cpu_decode(art.model, int8_activations=args.int8_activations)
    options = {"int8_activations": args.int8_activations}
    if MODES[args.mode]:
        options["guard_filter_fn"] = getattr(torch.compiler, MODES[args.mode])
    compiled = torch.compile(art.model, backend="sparsefx", options=options)
    dense, _ = load_model(args.model)
    prompt = eval_windows(art.tokenizer, PROTOCOL)[:1, :args.prompt]
    for model in (compiled, dense):  # warm-up: compiles for the prompt and the decode shapes, kernel builds
        decode_tok_s(model, prompt, 4)
    speeds = {"compiled": [], "dense": []}
    for _ in range(args.reps):
        speeds["compiled"].append(decode_tok_s(compiled, prompt, args.new_tokens))
        speeds["dense"].append(decode_tok_s(dense, prompt, args.new_tokens))
    print(json.dumps({k: statistics.median(v) for k, v in speeds.items()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*", help="folders written by `sparsefx compress`")
    ap.add_argument("--model", default="smollm2", help="the dense model the artifacts came from")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per artifact and mode")
    ap.add_argument("--reps", type=int, default=3, help="timed decodes per process (median)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--int8-activations", action="store_true", help="prepare and compile with int8 activations")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help="results file suffix: decode_guards[_TAG]_<model>")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.artifacts:
        ap.error("name at least one artifact folder (`sparsefx compress MODEL -r RECIPE -o DIR` writes one)")
    from harness import run_meta, write_results

    from sparsefx.experiments import print_table

    runs: dict[tuple[str, str], list[dict]] = {(a, m): [] for a in args.artifacts for m in MODES}
    for r in range(args.rounds):
        for artifact in args.artifacts:
            for mode in (MODES if r % 2 == 0 else reversed(MODES)):
                cmd = [sys.executable, __file__, "--child", artifact, "--mode", mode, "--model", args.model,
                       "--reps", str(args.reps), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
                cmd += ["--int8-activations"] if args.int8_activations else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{artifact} ({mode}) failed:\n{proc.stderr[-3000:]}")
                runs[artifact, mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}: {artifact} {mode}: {runs[artifact, mode][-1]}", file=sys.stderr)
    rows = []
    for artifact in args.artifacts:
        default = statistics.median(x["compiled"] for x in runs[artifact, "default"])
        for mode in MODES:
            tok_s = [x["compiled"] for x in runs[artifact, mode]]
            dense = [x["dense"] for x in runs[artifact, mode]]
            rows.append({"artifact": Path(artifact).name, "guards": mode,
                         "decode_tok_s": round(statistics.median(tok_s), 2),
                         "min_tok_s": round(min(tok_s), 2), "max_tok_s": round(max(tok_s), 2),
                         "dense_eager_tok_s": round(statistics.median(dense), 2),
                         "vs_dense": round(statistics.median(t / d for t, d in zip(tok_s, dense)), 3),
                         "vs_default_guards": round(statistics.median(tok_s) / default, 3)})
    print_table(rows, f"{args.model} compiled decode (backend sparsefx), batch 1, prompt {args.prompt}, "
                      f"{args.new_tokens} new tokens, one compiled model per process")
    meta = run_meta(**{k: v for k, v in vars(args).items() if k not in ("out", "child", "mode")})
    write_results(args.out, f"decode_guards{'_' + args.tag if args.tag else ''}_{args.model}", rows, meta)


if __name__ == "__main__":
    main()
