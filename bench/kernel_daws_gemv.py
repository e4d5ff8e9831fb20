"""DAWS batch-1 GEMV on CPU: how its medium tier is stored, vs the best dense fp32 path and TEAL, one run.

    python bench/kernel_daws_gemv.py              # shapes of DEVELOPERS.md, 50 % effective sparsity

Per shape and tier shape (medium share m of the channels, its weights pruned to sparsity s; the low tier takes the
rest of the 50 % effective sparsity), the medium tier's rows are read
- ``dense32`` / ``dense16``: stored dense (pruned weights are zeros in the row), fp32 or fp16;
- ``packed32`` / ``packed16``: bitmask-packed (``ops.routed.cpu.pack_medium_rows``: kept values + 1 bit per
  weight), fp32 or fp16.
TEAL at 50 % (one tier, half the rows) is the byte-count yardstick. Ratios are against the fastest dense fp32 call
(``harness.dense_gemv_calls``: ``mv``, ``linear``, or ``linear`` over the transposed copy). Weights are cold (copies past the last-level
cache), variants timed interleaved (``harness.interleaved_medians``). Every variant is checked against the
reference first. Writes bench/results/kernel_daws_gemv.csv and .json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsefx.ops.routed.cpu import pack_medium_rows, tiered_gemv, tiered_gemv_packed, tiered_gemv_reference
from sparsefx.passes.masks import compute_mask

from harness import (best_dense, dense_gemv_calls, interleaved_medians, kernel_bench_cases, run_meta,
                     sparse_gemv_bench_args, write_results)

EFFECTIVE = 0.5
TIER_SHAPES = [(0.2, 0.5), (0.4, 0.5), (0.6, 0.35)]   # (medium share, medium weight sparsity): recipes daws-50[-m..]


def main() -> None:
    args = sparse_gemv_bench_args(Path(__file__).parent / "results")
    rows = []
    for out_f, in_f, gen, x, ws, wts, nxt in kernel_bench_cases():
        teal = float(x.abs().quantile(EFFECTIVE))
        for m, s in TIER_SHAPES:
            q_low = EFFECTIVE - m * s
            t_low, t_high = float(x.abs().quantile(q_low)), float(x.abs().quantile(q_low + m))
            med = [(w * compute_mask(w.abs(), s)).t().contiguous() for w in ws]
            # per copy, the medium tier as the kernel's trailing tensor arguments: (rows,) or (mask, values, offsets)
            stores = {"dense32": [(t,) for t in med], "dense16": [(t.half(),) for t in med],
                      "packed32": [pack_medium_rows(t) for t in med], "packed16": [pack_medium_rows(t.half()) for t in med]}
            fns = {**dense_gemv_calls(x, ws, wts, nxt),
                   "teal50": lambda: tiered_gemv(x, wts[nxt()], None, teal, teal)}
            for name, store in stores.items():
                packed = name.startswith("packed")
                call = tiered_gemv_packed if packed else tiered_gemv
                dtype = store[0][1 if packed else 0].dtype       # the values' / rows' dtype: fp32 or fp16
                ref = tiered_gemv_reference(x, wts[0], med[0].to(dtype), t_high, t_low)
                torch.testing.assert_close(call(x, wts[0], *store[0], t_high, t_low), ref, rtol=1e-4, atol=1e-3)

                def fn(call=call, store=store):
                    i = nxt()
                    return call(x, wts[i], *store[i], t_high, t_low)

                fns[name] = fn
            t = interleaved_medians(fns, args.reps)
            dense, dense_call = best_dense(t)
            row = {"out": out_f, "in": in_f, "medium_share": m, "medium_weight_sparsity": s,
                   "dense_ms": round(dense * 1e3, 4), "best_dense": dense_call, "teal50_vs_dense": round(dense / t["teal50"], 3)}
            row.update({f"{name}_vs_dense": round(dense / t[name], 3) for name in stores})
            rows.append(row)
            print(row, flush=True)
            del med, stores
        del ws, wts
    write_results(args.out, "kernel_daws_gemv", rows, run_meta(reps=args.reps, effective_sparsity=EFFECTIVE))


if __name__ == "__main__":
    main()
