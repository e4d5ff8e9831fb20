"""Sweeps that compress a model with several recipes and evaluate each under one protocol, in one run.

Used by ``sparsefx demo`` and by the benchmarks in ``bench/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from .data import PROTOCOL, Protocol, eval_windows, recipe_calibration
from .eval import evaluate
from .models import load_model
from .passes.config import Recipe
from .pipeline import compress


def sweep(model_name: str, recipes: list[Recipe], protocol: Protocol = PROTOCOL, speed: bool = True,
          progress: bool = True, calib_samples: int | None = None, on_row=None) -> list[dict]:
    """Evaluate the dense model, then each recipe on a fresh copy; one row per variant.

    ``calib_samples`` overrides the recipes' calibration sample count (for quick runs); ``on_row(rows)`` is called
    after each row (to save partial results of long sweeps).

    Example:
        >>> rows = sweep("smollm2", [resolve_recipe("wanda-50")])  # doctest: +SKIP
    """
    model, tok = load_model(model_name)
    windows = eval_windows(tok, protocol)
    dense = evaluate(model, tok, protocol, speed=speed, progress=progress, windows=windows)
    rows = [_row("dense", dense, dense, 0.0, None)]
    if on_row:
        on_row(rows)
    del model
    calib_cache: dict = {}
    for recipe in recipes:
        cal = recipe.calibration
        if calib_samples is not None:
            cal = dataclasses.replace(cal, samples=calib_samples)
            recipe = dataclasses.replace(recipe, calibration=cal)
        calibration = None
        if recipe.needs_calibration:
            key = (cal.text, cal.samples, cal.seqlen)
            if key not in calib_cache:
                calib_cache[key] = recipe_calibration(tok, recipe, protocol)
            calibration = calib_cache[key]
        model, _ = load_model(model_name)
        t0 = time.perf_counter()
        result = compress(model, recipe, calibration=calibration, progress=progress)
        seconds = time.perf_counter() - t0
        res = evaluate(model, tok, protocol, speed=speed, progress=progress, windows=windows)
        # activation-sparsity passes report the fraction of linear multiply-adds skipped per token; quantizing
        # passes the stored bits per weight of the linears they rewrote; DAM which order each linear took
        rows.append(_row(recipe.name or recipe.passes[0].method, res, dense, seconds,
                         result.reported("effective_sparsity"), result.reported("bits_per_weight")))
        orders = result.reported("orders")
        if orders:
            rows[-1]["dam_orders"] = " ".join(f"{k}:{v}" for k, v in sorted(orders.items()))
        if on_row:
            on_row(rows)
        del model
    return rows


def _row(name, res, dense, compress_s, effective, bits_per_weight=None) -> dict:
    return {
        "variant": name,
        "ppl": round(res.ppl, 4),
        "ppl_vs_dense": round(res.ppl / dense.ppl, 4),
        "linear_sparsity": round(res.linear_sparsity, 4),
        "effective_sparsity": None if effective is None else round(effective, 4),
        "bits_per_weight": None if bits_per_weight is None else round(bits_per_weight, 4),
        "params_nonzero": res.params_nonzero,
        "decode_tok_s": round(res.decode_tok_s, 2) if res.decode_tok_s else None,
        "decode_vs_dense": round(res.decode_tok_s / dense.decode_tok_s, 3) if res.decode_tok_s else None,
        "eval_tokens": res.tokens,
        "compress_s": round(compress_s, 1),
    }


# Kernel benchmarks (bench/kernel_*.py): the [out, in] shapes of DEVELOPERS.md, and how many bytes of weight copies
# a benchmark cycles through so that every call reads its weights from DRAM, as decode does.
KERNEL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]
COLD_BYTES = 512e6  # well past this machine's last-level cache


def cold_copies(nbytes: float) -> int:
    """How many copies of a weight of ``nbytes`` bytes add up to ``COLD_BYTES`` (at least 2)."""
    return max(2, int(COLD_BYTES // nbytes))


def cold_weights(out_f: int, in_f: int, copies: int, gen: torch.Generator):
    """``copies`` random weights ``[out, in]``, their transposes stored ``[in, out]``, and ``nxt()``, which returns
    the next copy's index, round and round: a kernel benchmark's calls each read a copy that is not in cache."""
    ws = [torch.randn(out_f, in_f, generator=gen) for _ in range(copies)]
    wts = [w.t().contiguous() for w in ws]
    state = {"i": 0}

    def nxt() -> int:
        state["i"] = (state["i"] + 1) % copies
        return state["i"]

    return ws, wts, nxt


DENSE_CALLS = ("mv", "linear", "linear_t")


def dense_gemv_calls(x: torch.Tensor, ws, wts, nxt) -> dict:
    """The dense fp32 products a kernel benchmark measures itself against, each on the next cold copy (``nxt()``):
    ``mv`` (``torch.mv(W, x)``, one row of x only) and ``linear`` (``F.linear(x, W)``) read W's ``[out, in]`` rows;
    ``linear_t`` is ``F.linear`` over the transposed copy (``Wt: [in, out]`` contiguous, the layout
    ``codegen.cpu.prepare_cpu_decode`` gives dense linears), which MKL streams faster on some shapes. The baseline
    is the fastest of them (``best_dense``)."""
    fns = {"linear": lambda: torch.nn.functional.linear(x, ws[nxt()]),
           "linear_t": lambda: torch.nn.functional.linear(x, wts[nxt()].t())}
    if x.dim() == 1 or x.shape[0] == 1:
        fns["mv"] = lambda: torch.mv(ws[nxt()], x.reshape(-1))
    return fns


def best_dense(t: dict) -> tuple[float, str]:
    """The fastest of the ``dense_gemv_calls`` timed in ``t`` (seconds per call) and its name."""
    name = min((k for k in DENSE_CALLS if k in t), key=t.__getitem__)
    return t[name], name


def kernel_bench_cases():
    """Per shape of ``KERNEL_SHAPES``: ``(out, in, gen, x, ws, wts, nxt)`` — a seeded generator, the input
    ``x: [in]`` drawn from it, then cold fp32 weight copies and their transposes (``cold_weights``), enough copies
    that weight and transpose together pass the last-level cache."""
    for out_f, in_f in KERNEL_SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(in_f, generator=gen)
        ws, wts, nxt = cold_weights(out_f, in_f, cold_copies(out_f * in_f * 4 * 2), gen)
        yield out_f, in_f, gen, x, ws, wts, nxt
        del ws, wts   # callers drop theirs too: the next shape's copies are made without these


def kernel_bench_parser(out_default) -> argparse.ArgumentParser:
    """The arguments every kernel benchmark takes: ``--reps`` and ``--out``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100, help="calls per variant, in 5 interleaved rounds")
    ap.add_argument("--out", default=str(out_default))
    return ap


def sparse_gemv_bench_args(out_default) -> argparse.Namespace:
    """``kernel_bench_parser``'s arguments for a benchmark of the C++ activation-sparse GEMV; exits when the
    extension does not build here (nothing to benchmark)."""
    from .codegen.cpu.sparse_gemv import _extension

    args = kernel_bench_parser(out_default).parse_args()
    if _extension() is None:
        raise SystemExit("the C++ kernel did not build; nothing to benchmark")
    return args


def interleaved_medians(fns: dict, reps: int, rounds: int = 5) -> dict:
    """Median seconds per call of each function, timed in ``rounds`` interleaved bursts of ``reps // rounds`` calls
    (after one warm-up call each), so drift in the machine's speed hits every variant alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, reps // rounds)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_meta(**extra) -> dict:
    """What a results file records about its run: the command line, torch, threads, machine, date, plus ``extra``."""
    import platform
    import sys

    import torch

    return {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), **extra}


def write_results(out_dir, stem: str, rows: list[dict], meta: dict) -> None:
    """Write ``rows`` to ``<out_dir>/<stem>.csv`` and, with ``meta``, to ``<stem>.json`` (each atomically).

    Example:
        >>> write_results("bench/results", "masks_smollm2", rows, {"command": "..."})  # doctest: +SKIP
    """
    import csv
    import io
    import json
    from pathlib import Path

    from ._cache import atomic_write_bytes

    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))     # every column any row has, first-seen order
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(out_dir) / f"{stem}.csv", buf.getvalue().encode())
    atomic_write_bytes(Path(out_dir) / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1).encode())


# How print_table heads the sweep rows' columns (the JSON keeps the keys); a column empty in every row is left out.
_SHOWN = {"variant": "variant", "ppl": "ppl", "ppl_vs_dense": "ppl ×dense", "linear_sparsity": "sparsity",
          "effective_sparsity": "effective", "bits_per_weight": "bits/weight", "params_nonzero": "non-zero",
          "decode_tok_s": "tok/s", "decode_vs_dense": "tok/s ×dense", "compress_s": "compress s"}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.2f}" if abs(v) >= 10 else f"{v:.3f}"


def print_table(rows: list[dict], title: str = "") -> None:
    """Print sweep rows as a table (rich) that fits a normal terminal: short headers, no empty columns, numbers
    rounded for reading (the JSON keeps them whole). Piped (no terminal, no ``COLUMNS``), the table keeps its natural
    width instead of rich's default 80 columns, so no cell is cut."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    cols = [c for c in _SHOWN if any(r.get(c) is not None for r in rows)]
    table = Table(title=title or None)
    for col in cols:
        table.add_column(_SHOWN[col], justify="left" if col == "variant" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    Console(width=200 if piped else None).print(table)
