"""Batch-1 activation-sparse GEMV on CPU vs the best dense fp32 path, cold weights, ratios from one run.

    python bench/kernel_sparse_gemv.py            # shapes of DEVELOPERS.md, sparsity 0/40/50/60/75%

"Cold": each call uses the next of several weight copies that together exceed the last-level cache, as in decode,
where every layer's weights come from DRAM. Dense = the fastest of torch.mv(W, x), F.linear(x, W) and F.linear over
the transposed copy (MKL/oneDNN; ``harness.dense_gemv_calls``).
Variants are timed interleaved (round after round, a burst of calls each), so drift in the machine's memory
bandwidth hits dense and sparse alike; each time is the median over all calls.
Shapes are [out x in] of the Linear (W: [out, in]); the sparse kernel stores W.T ([in, out]).
Writes bench/results/kernel_sparse_gemv.csv and .json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsefx.ops.routed.cpu import sparse_gemv, sparse_gemv_reference

from harness import (KERNEL_SHAPES, best_dense, cold_copies, cold_weights, dense_gemv_calls, interleaved_medians,
                     run_meta, sparse_gemv_bench_args, write_results)

SPARSITIES = [0.0, 0.4, 0.5, 0.6, 0.75]


def main() -> None:
    args = sparse_gemv_bench_args(Path(__file__).parent / "results")
    rows = []
    for out_f, in_f in KERNEL_SHAPES:
        copies = cold_copies(out_f * in_f * 4)
        gen = torch.Generator().manual_seed(0)
        ws, wts, nxt = cold_weights(out_f, in_f, copies, gen)
        x = torch.randn(in_f, generator=gen)

        thresholds = {sp: float(x.abs().quantile(sp)) if sp > 0 else 0.0 for sp in SPARSITIES}
        for thr in thresholds.values():
            torch.testing.assert_close(sparse_gemv(x, wts[0], thr), sparse_gemv_reference(x, wts[0], thr),
                                       rtol=1e-4, atol=1e-3)
        fns = dense_gemv_calls(x, ws, wts, nxt)
        fns.update({sp: (lambda thr=thr: sparse_gemv(x, wts[nxt()], thr)) for sp, thr in thresholds.items()})
        t = interleaved_medians(fns, args.reps)
        dense, dense_call = best_dense(t)
        for sp, thr in thresholds.items():
            kept, t_sp = int((x.abs() >= thr).sum()), t[sp]
            rows.append({"out": out_f, "in": in_f, "sparsity": sp, "kept": kept,
                         "dense_mv_ms": round(t["mv"] * 1e3, 4), "dense_linear_ms": round(t["linear"] * 1e3, 4),
                         "dense_linear_t_ms": round(t["linear_t"] * 1e3, 4), "best_dense": dense_call,
                         "sparse_ms": round(t_sp * 1e3, 4), "speedup_vs_best_dense": round(dense / t_sp, 3),
                         "ideal_speedup": round(in_f / max(kept, 1), 3),
                         "sparse_GBps": round(kept * out_f * 4 / t_sp / 1e9, 2),
                         "dense_GBps": round(out_f * in_f * 4 / dense / 1e9, 2)})
            print(rows[-1], flush=True)
        del ws, wts
    write_results(args.out, "kernel_sparse_gemv", rows, run_meta(reps=args.reps))


if __name__ == "__main__":
    main()
