"""``sparsefx autotune``: time each kernel's configs on a model's shapes and store the best in the autotune cache
(``ops/tuning.py``, which the kernels' launchers read at run time)."""

from __future__ import annotations

import logging

import torch

from ..ops.quant import triton as tq
from ..ops.quant.eager import LowRankQuantLinear, QuantLinear
from ..ops.quant.format import QuantSpec
from ..ops.routed import triton as tt
from ..ops.routed.cpu import extension, tiered_gemv
from ..ops.routed.eager import BandedLinear, MultiTierLinear, TieredLinear
from ..ops.routed.format import pack_bands
from ..passes.quant import quantize_rtn

log = logging.getLogger(__name__)


def model_shapes(model: torch.nn.Module) -> dict[str, set]:
    """The kernel shapes a model needs, by kernel: ``tiered_gemv`` ``(in, out)`` for its linears (every
    ``nn.Linear`` or DAWS linear: the CPU decode step reads the tiered GEMV's tuning for all of them),
    ``banded_gemv`` ``(in, out)`` for its banded DAWS linears, ``quant_matmul`` ``(1, in, out, bits)`` for its
    quantized linears (tuned as ``quant_gemv`` ``(in, out, bits)`` where the GEMV kernel takes them).

    Example:
        >>> model_shapes(tiny_model("llama"))["tiered_gemv"]  # doctest: +SKIP
        {(64, 64), (64, 96), (96, 64), (64, 32)}
    """
    shapes: dict[str, set] = {"tiered_gemv": set(), "banded_gemv": set(), "quant_matmul": set()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            shapes["quant_matmul"].add((1, m.in_features, m.out_features, m.spec.bits))
        elif isinstance(m, LowRankQuantLinear):
            if m.attrs.get("bits") and m.lq_packed is not None:
                shapes["quant_matmul"].add((1, m.in_features, m.out_features, int(m.attrs["bits"])))
        elif isinstance(m, (torch.nn.Linear, TieredLinear, MultiTierLinear, BandedLinear)) and \
                not name.endswith("lm_head"):
            shapes["tiered_gemv"].add((m.in_features, m.out_features))
            if isinstance(m, BandedLinear):
                shapes["banded_gemv"].add((m.in_features, m.out_features))
    return shapes


def _wall_us(fn, reps: int) -> float:
    """Median wall-clock microseconds of ``fn`` after a warm-up call (CPU)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def graph_us(fns: list, rep_ms: int = 20) -> float:
    """GPU microseconds per call of ``fns`` (calls of one kernel, each over its own copy of the weights, so that
    weights come from device memory, not L2, as in decode), timed as CUDA-graph replays: a Python launch costs
    tens of microseconds, more than a decode GEMV's kernel, and decode hides it the same way (CUDA graphs,
    ``torch.compile(mode="reduce-overhead")``). Median of ``triton.testing.do_bench_cudagraph``."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(lambda: [f() for f in fns], rep=rep_ms, return_mode="median")) * 1e3 / len(fns)


def time_us(fns: list, reps: int, cuda: bool) -> float:
    """Microseconds per call: on CUDA ``graph_us`` over ``fns`` (at least 20 ms of replays); on CPU the wall clock
    of ``fns[0]`` over ``reps`` calls (Triton's interpreter: checks that code runs, says nothing about speed)."""
    return graph_us(fns, rep_ms=max(20, reps)) if cuda else _wall_us(fns[0], reps)


COLD_BYTES = 512e6  # well past a CPU's last-level cache and a GPU's L2


def cold_copies(nbytes: float) -> int:
    """How many copies of a weight of ``nbytes`` bytes add up to ``COLD_BYTES`` (at least 2): a timing loop that
    cycles through them reads every call's weights from DRAM, as decode does."""
    return max(2, int(COLD_BYTES // nbytes))


def cold_copies_of(t: torch.Tensor | None, nbytes: float, cuda: bool) -> list:
    """``t`` and copies of it, as many as make ``nbytes``-sized sets add up to well past the GPU's L2
    (``COLD_BYTES``); on CPU ``t`` alone (no GPU cache to defeat)."""
    n = cold_copies(nbytes) if cuda else 1
    return [t] + [None if t is None else t.clone() for _ in range(n - 1)]


def _tiered_inputs(k: int, n: int, sparsity: float, device, dtype):
    """A decode input whose fraction ``sparsity`` of channels falls below the threshold, and the weights."""
    g = torch.Generator().manual_seed(k * 31 + n)
    x = torch.randn(k, generator=g)
    t = float(x.abs().quantile(sparsity)) if sparsity > 0 else 0.0
    w = torch.randn(n, k, generator=g)
    return x.to(device, dtype), w.t().contiguous().to(device, dtype), t


# Routing the banded GEMV is tuned at (its launcher's key has no sparsity bin): the share of channels in the full
# tier and the three medium tiers, the rest dropped — about what daws-50-mt3 gives (bench/kernel_multitier_gemv.py).
BANDED_TIER_SHARES = (0.03, 0.44, 0.22, 0.12)


def banded_inputs(k: int, n: int, device, dtype):
    """A decode input ``x: [k]`` routed into ``BANDED_TIER_SHARES``, a banded ``[k, n]`` matrix (``W.T`` with
    three medium tiers at 25/50/75 %) and the thresholds — what ``tune_triton`` and ``bench/kernel_triton.py``
    time the banded GEMV on.

    Example:
        >>> x, wt, ts = banded_inputs(64, 32, "cpu", torch.float32)
        >>> wt.shape, len(ts)
        (torch.Size([64, 32]), 4)
    """
    g = torch.Generator().manual_seed(k * 37 + n)
    x = torch.randn(k, generator=g)
    w = torch.randn(n, k, generator=g)
    cuts = [float(w.abs().flatten().kthvalue(max(1, int(q * w.numel()))).values) for q in (0.25, 0.5, 0.75)]
    above, thresholds = 0.0, []
    for share in BANDED_TIER_SHARES:
        above += share
        thresholds.append(float(x.abs().quantile(1.0 - above)))
    return x.to(device, dtype), pack_bands(w, cuts).t().contiguous().to(device), thresholds


def tune_triton(shapes: dict[str, set], device, sparsities=(0.5,), reps: int = 50, max_configs: int | None = None,
                dtype=torch.float16, progress=None) -> list[dict]:
    """Time every config of the Triton kernels on each shape (and sparsity bin) with cold weights (``graph_us``);
    return the best per key."""
    cuda = torch.device(device).type == "cuda"
    results = []
    for k, n in sorted(shapes.get("tiered_gemv", ())):
        for s in sparsities:
            x, wt, t = _tiered_inputs(k, n, s, device, dtype)
            wts = cold_copies_of(wt, wt.numel() * wt.element_size(), cuda)
            best = None
            for cfg in tt.gemv_configs()[:max_configs]:
                us = time_us([lambda w=w: tt.tiered_gemv(x, w, None, t, t, config=cfg) for w in wts], reps, cuda)
                if best is None or us < best[1]:
                    best = (cfg, us)
            dense = time_us([lambda w=w: w.t() @ x for w in wts], reps, cuda)
            results.append({"kernel": "tiered_gemv", "shape": (k, n), "sparsity": s, "config": best[0],
                            "us": round(best[1], 2), "dense_us": round(dense, 2)})
            if progress:
                progress(results[-1])
    for k, n in sorted(shapes.get("banded_gemv", ())):
        x, wt, ts = banded_inputs(k, n, device, dtype)
        wts = cold_copies_of(wt, wt.numel() * wt.element_size(), cuda)
        best = None
        for cfg in [c for c in tt.gemv_configs() if not c.get("GATHER")][:max_configs]:
            us = time_us([lambda w=w: tt.banded_gemv(x, w, ts, config=cfg) for w in wts], reps, cuda)
            if best is None or us < best[1]:
                best = (cfg, us)
        dense = time_us([lambda w=w: w.t() @ x.to(w.dtype) for w in wts], reps, cuda)   # the same fp16 bytes, dense
        results.append({"kernel": "banded_gemv", "shape": (k, n), "sparsity": None, "config": best[0],
                        "us": round(best[1], 2), "dense_us": round(dense, 2)})
        if progress:
            progress(results[-1])
    for m, k, n, bits in sorted(shapes.get("quant_matmul", ())):
        group = next(gs for gs in (128, 64, 32, 96, 192) if k % gs == 0)
        qw = quantize_rtn(torch.randn(n, k), QuantSpec(bits, group))
        packed = [tq.Packed(p, qw.scales.to(device), qw.zeros.to(device), bits, group)
                  for p in cold_copies_of(qw.packed.to(device), qw.nbytes, cuda)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        if tq.gemv_eligible(m, packed[0]):     # one token: the GEMV kernel, keyed without the row count
            kernel, key, candidates = "quant_gemv", (k, n, bits), tq.gemv_configs()
            run = tq.quant_gemv
        else:
            kernel, key = "quant_matmul", (m, k, n, bits)
            candidates = [c for c in tq.configs() if (c["BLOCK_M"] == 1) == (m == 1)]
            run = tq.quant_matmul
        best = None
        for cfg in candidates[:max_configs]:
            us = time_us([lambda p=p: run(x, p, config=cfg) for p in packed], reps, cuda)
            if best is None or us < best[1]:
                best = (cfg, us)
        ws = cold_copies_of(torch.randn(n, k, device=device, dtype=dtype), n * k * x.element_size(), cuda)
        dense = time_us([lambda w=w: x @ w.t() for w in ws], reps, cuda)
        results.append({"kernel": kernel, "shape": key, "sparsity": None, "config": best[0],
                        "us": round(best[1], 2), "dense_us": round(dense, 2)})
        if progress:
            progress(results[-1])
    return results


def tune_cpu(shapes: dict[str, set], sparsities=(0.25, 0.4, 0.5, 0.6, 0.75), reps: int = 50,
             progress=None) -> list[dict]:
    """CPU: the C++ tiered GEMV against the dense fp32 GEMV per shape and sparsity bin; the config records the
    lowest sparsity at which the sparse kernel wins (``min_sparsity``; ``None`` if it never does)."""
    if extension() is None:
        raise RuntimeError("the C++ CPU kernel did not build on this machine; nothing to tune")
    results = []
    for k, n in sorted(shapes.get("tiered_gemv", ())):
        wins = []
        for s in sparsities:
            x, wt, t = _tiered_inputs(k, n, s, "cpu", torch.float32)
            w = wt.t()
            sparse = _wall_us(lambda: tiered_gemv(x, wt, None, t, t), reps)
            dense = _wall_us(lambda: torch.mv(w, x), reps)
            wins.append((s, sparse, dense))
            if progress:
                progress({"kernel": "cpu_tiered_gemv", "shape": (k, n), "sparsity": s, "us": round(sparse, 2),
                          "dense_us": round(dense, 2)})
        # the lowest bin from which the sparse kernel wins at every higher bin too (one noisy bin does not count)
        first = None
        for s, sp, de in reversed(wins):
            if sp >= de:
                break
            first = s
        results.append({"kernel": "cpu_tiered_gemv", "shape": (k, n), "sparsity": None,
                        "config": {"min_sparsity": first},
                        "us": round(min(sp for _, sp, _ in wins), 2),
                        "bins": [{"sparsity": s, "us": round(sp, 2), "dense_us": round(de, 2)} for s, sp, de in wins]})
    return results


__all__ = ["BANDED_TIER_SHARES", "banded_inputs", "cold_copies_of", "graph_us", "model_shapes", "time_us", "tune_cpu",
           "tune_triton"]
