"""What the benchmarks in ``bench/`` share: cold weight copies and the dense baselines of the kernel benchmarks,
interleaved timing, and how a run's results files are written (``bench/results/<stem>.{csv,json}`` with the run's
command and machine). Benchmark scripts import it as ``harness`` (``python bench/<script>.py`` puts ``bench/`` on
the path); none of it is part of the installed package."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsefx.codegen.autotune import cold_copies

# Kernel benchmarks (bench/kernel_*.py): the [out, in] shapes of DEVELOPERS.md, and how many bytes of weight copies
# a benchmark cycles through so that every call reads its weights from DRAM, as decode does.
KERNEL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]


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
    from sparsefx.ops.routed.cpu import extension

    args = kernel_bench_parser(out_default).parse_args()
    if extension() is None:
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

    from sparsefx._cache import atomic_write_bytes

    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))     # every column any row has, first-seen order
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(out_dir) / f"{stem}.csv", buf.getvalue().encode())
    atomic_write_bytes(Path(out_dir) / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1).encode())
