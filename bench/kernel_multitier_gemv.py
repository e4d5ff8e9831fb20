"""DAWS with several medium tiers (``daws.medium_tiers``) as a batch-1 GEMV on CPU, vs dense fp32, TEAL and the
three-tier DAWS kernel, all at 50 % effective sparsity, one run.

    python bench/kernel_multitier_gemv.py         # shapes of DEVELOPERS.md

Per shape, the routing is solved as the pass solves it (``passes.daws.solve_levels`` / ``solve_tiers``) from the
|x| statistics of 4,096 tokens drawn like the benchmark's input (standard normal) and the weight's |W| quantiles:
- ``mt3_f32`` / ``mt3_f16``: medium tiers at 25/50/75 % weight sparsity (recipe daws-50-mt3[-f16]), stored fp32 / fp16;
- ``mt3_banded``: the same tiers and routing in one banded fp16 matrix (recipe daws-50-mt3-banded, ``banded_gemv``);
- ``dense_f16``: that banded matrix with every threshold zero — a dense GEMV over fp16 storage, the dense baseline
  for the same bytes per weight (the ``_vs_dense`` ratios are against the fastest dense fp32 call of
  ``harness.dense_gemv_calls``: ``mv``, ``linear``, or ``linear`` over the transposed copy);
- ``m60s35_f16``: one medium tier, 60 % of the channels at 35 % (recipe daws-50-m60-s35-f16);
- ``teal50``: one tier, half the rows.
The row also gives the share of channels per tier and the bytes read relative to the dense weight. Weights are cold
(copies past the last-level cache), variants timed interleaved (``harness.interleaved_medians``), every variant
checked against its reference first. Writes bench/results/kernel_multitier_gemv.csv and .json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsefx.ops.routed.cpu import (banded_gemv, banded_gemv_reference, multitier_gemv, multitier_gemv_reference, tiered_gemv)
from sparsefx.ops.routed.format import pack_bands
from sparsefx.passes.calibrate import Observer
from sparsefx.passes.daws import magnitude_quantiles, solve_levels, solve_tiers
from sparsefx.passes.masks import compute_mask

from harness import (best_dense, dense_gemv_calls, interleaved_medians, kernel_bench_cases, run_meta,
                     sparse_gemv_bench_args, write_results)

EFFECTIVE = 0.5
MEDIUM_TIERS = (0.25, 0.5, 0.75)


def _levels(w: torch.Tensor, stats):
    """Medium tiers of ``w`` (nested global |W| masks, their |W| cuts) and the routing at ``EFFECTIVE``, as the pass
    builds them."""
    w_abs = w.abs()
    nominal = (1.0, *(1.0 - s for s in MEDIUM_TIERS), 0.0)
    boundary = magnitude_quantiles(w_abs, [(a + b) / 2 for a, b in zip(nominal, nominal[1:])])
    cuts = magnitude_quantiles(w_abs, nominal[1:-1])
    keeps = [w_abs >= c for c in cuts]
    densities = (1.0, *(float(k.float().mean()) for k in keeps), 0.0)
    return keeps, cuts, solve_levels(stats, boundary, densities, EFFECTIVE)


def main() -> None:
    args = sparse_gemv_bench_args(Path(__file__).parent / "results")
    rows = []
    for out_f, in_f, gen, x, ws, wts, nxt in kernel_bench_cases():
        observer = Observer(in_f)
        observer(torch.randn(4096, in_f, generator=gen))
        stats = observer.stats()

        keeps, cuts, levels = _levels(ws[0], stats)
        ts = list(levels.thresholds)
        mt32 = [[(w * k).t().contiguous() for k in keeps] for w in ws]   # the same masks on every copy: same bytes
        mt16 = [[t.half() for t in ms] for ms in mt32]
        banded = [pack_bands(w, cuts).t().contiguous() for w in ws]
        dense_ts = [0.0] * len(ts)
        tiers = solve_tiers(stats, EFFECTIVE, 0.6, 0.35)
        m60 = [(w * compute_mask(w.abs(), 0.35)).t().contiguous().half() for w in ws]
        teal = float(stats.quantile(EFFECTIVE))
        for ms in (mt32, mt16):
            ref = multitier_gemv_reference(x, wts[0], ms[0], ts)
            torch.testing.assert_close(multitier_gemv(x, wts[0], ms[0], ts), ref, rtol=1e-4, atol=1e-3)
        for th in (ts, dense_ts):
            torch.testing.assert_close(banded_gemv(x, banded[0], th), banded_gemv_reference(x, banded[0], th),
                                       rtol=1e-4, atol=1e-3)

        def run(mediums):
            def fn():
                i = nxt()
                return multitier_gemv(x, wts[i], mediums[i], ts)
            return fn

        def three_tier():
            i = nxt()
            return tiered_gemv(x, wts[i], m60[i], tiers.t_high, tiers.t_low)

        fns = {**dense_gemv_calls(x, ws, wts, nxt),
               "teal50": lambda: tiered_gemv(x, wts[nxt()], None, teal, teal), "m60s35_f16": three_tier,
               "mt3_f32": run(mt32), "mt3_f16": run(mt16),
               "mt3_banded": lambda: banded_gemv(x, banded[nxt()], ts),
               "dense_f16": lambda: banded_gemv(x, banded[nxt()], dense_ts)}
        t = interleaved_medians(fns, args.reps)
        dense, dense_call = best_dense(t)
        a = x.abs()
        shares = [float((a >= ts[0]).float().mean())]
        shares += [float(((a >= lo) & (a < hi)).float().mean()) for hi, lo in zip(ts, ts[1:])]
        row = {"out": out_f, "in": in_f, "dense_ms": round(dense * 1e3, 4), "best_dense": dense_call,
               "mt3_channel_shares": "/".join(f"{s:.3f}" for s in shares),   # high / medium tiers ... (rest: dropped)
               "mt3_f16_bytes_vs_dense": round(shares[0] + 0.5 * sum(shares[1:]), 3)}
        row.update({f"{name}_vs_dense": round(dense / t[name], 3)
                    for name in ("teal50", "m60s35_f16", "mt3_f32", "mt3_f16", "mt3_banded", "dense_f16")})
        row["mt3_banded_vs_dense_f16"] = round(t["dense_f16"] / t["mt3_banded"], 3)
        rows.append(row)
        print(row, flush=True)
        del ws, wts, mt32, mt16, m60, banded
    write_results(args.out, "kernel_multitier_gemv", rows,
                  run_meta(reps=args.reps, effective_sparsity=EFFECTIVE, medium_tiers=list(MEDIUM_TIERS)))


if __name__ == "__main__":
    main()
