"""Triton kernels vs torch dense (cuBLAS) on a GPU, ratios from one run; bandwidth achieved.

    python bench/kernel_triton.py [--tune]           # needs CUDA; writes bench/results/kernel_triton_<gpu>.csv/.json

Decode shapes (batch 1) of DEVELOPERS.md, weights in bf16 (tiered) or packed codes (quant):
  * tiered GEMV (TEAL-style single tier and DAWS's two tiers) at 0/40/50/75 % activation sparsity, over ``W.T`` and
    over ``block_layout(W.T, 64)`` (``blocked``: each output block's rows contiguous);
  * dequant GEMV at 4 and 3 bits (group 128, asymmetric): the general kernel (``qmm``, element-wise dequantization)
    and the GEMV kernel (``quant_gemv``, byte loads — three-byte words at 3 bits — split in registers); DAM's
    whole linear (rank-64 4-bit factors: projection launch + main product with the low-rank epilogue);
  * N:M (2:4, 4:8) matmul over values + uint8 in-group indices (a magnitude mask of the same weight);
  * banded DAWS GEMV (``daws.layout: banded``: every tier in one fp16 matrix) at the routing ``sparsefx autotune``
    tunes it at (``autotune.BANDED_TIER_SHARES``: 81 % of rows read, about 50 % effective sparsity with three medium
    tiers at 25/50/75 %), and with every threshold zero (``all rows``: a dense GEMV over the same fp16 bytes); the
    same routing over the tiers stored apart in bf16 (``multitier_gemv``, ``layout: separate``).
Every row is against the best dense bf16 path of the same run (``F.linear`` on ``[in]`` and on ``[1, in]``, and
``F.linear`` over the transposed copy ``W.T`` that the tiered kernels read: the fastest). Times are GPU time per call
(``autotune.graph_us``): the calls of a variant run over enough copies of its weights to overflow L2 (weights come
from HBM, as in decode) and are captured in a CUDA graph, so Python's launch overhead (tens of microseconds per
kernel, more than a kernel takes) is not counted, as decode with CUDA graphs does not pay it. Bandwidth = bytes the
kernel must read / time, also as a fraction of a device-to-device copy's rate (the achievable peak, measured in the
same run). ``config``: ``heuristic`` (the launcher's default) or ``tuned`` (``--tune`` first runs
``autotune.tune_triton`` over these shapes in bf16 and stores the winners in the autotune cache; rows then show both).

``--smoke`` runs the same code on one tiny shape on CPU under ``TRITON_INTERPRET=1`` with wall-clock timing (and a
throw-away autotune cache): it checks that the script runs (the test suite does this), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from sparsefx.experiments import print_table

from harness import run_meta, write_results

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]     # [out, in]
SMOKE_SHAPES = [(128, 256)]
SPARSITIES = [0.0, 0.4, 0.5, 0.75]
RANK = 64
BLOCKED_N = 64        # output block of the blocked weight layout (tiered_gemv's programs then own 64 outputs)


def _copy_gbs(time_us, device, numel: int) -> float:
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_us([lambda: dst.copy_(src)]) * 1e-6) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tune", action="store_true", help="autotune these shapes first and time tuned configs too")
    ap.add_argument("--reps", type=int, default=20, help="milliseconds of graph replays per config while tuning")
    ap.add_argument("--cached", action="store_true", help="time tuned configs from the autotune cache as it is")
    ap.add_argument("--tune-bits", type=int, nargs="*", default=[4, 3],
                    help="bit widths of the quantized kernels to tune (others keep what the autotune cache has)")
    ap.add_argument("--kernels", nargs="+", choices=["tiered", "quant", "nm", "banded"],
                    default=["tiered", "quant", "nm", "banded"],
                    help="which kernels to time (dense is always timed)")
    ap.add_argument("--tag", default="", help="results file: bench/results/kernel_triton_<tag>_<gpu>.csv/.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU under the Triton interpreter")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # read when the kernel modules are first imported (below)
        os.environ["SPARSEFX_AUTOTUNE_CACHE"] = os.path.join(tempfile.mkdtemp(), "autotune.json")
        device, shapes, max_configs = "cpu", SMOKE_SHAPES, 2
    elif not torch.cuda.is_available():
        raise SystemExit("bench/kernel_triton.py needs a CUDA GPU (the CPU numbers are in bench/kernel_sparse_gemv.py; "
                         "--smoke checks the script on CPU)")
    else:
        device, shapes, max_configs = "cuda", SHAPES, None
    from sparsefx.codegen import autotune
    from sparsefx.ops import tuning
    from sparsefx.ops.nm import triton as tn
    from sparsefx.ops.quant import triton as tq
    from sparsefx.ops.quant.format import QuantSpec
    from sparsefx.ops.routed import triton as tt
    from sparsefx.ops.routed.format import tier_weight
    from sparsefx.passes.quant import quantize_rtn

    if args.tune:
        wanted = {"tiered_gemv": {(i, o) for o, i in shapes}, "banded_gemv": {(i, o) for o, i in shapes},
                  "quant_matmul": {(1, i, o, b) for o, i in shapes for b in args.tune_bits}
                  | {(1, i, RANK, 4) for _, i in shapes if 4 in args.tune_bits}}
        found = autotune.tune_triton(wanted, device, sparsities=(0.5,), reps=args.reps, max_configs=max_configs,
                                     dtype=torch.bfloat16, progress=lambda r: print("tuned", r, flush=True))
        tuning.store([{**r, "sparsity": None} for r in found], device)
    configs = ["heuristic", "tuned"] if args.tune or args.cached else ["heuristic"]

    cuda = device == "cuda"

    def time_us(fns) -> float:   # CUDA-graph replays over cold copies; a few wall-clock calls under --smoke
        return autotune.time_us(fns, 3, cuda)

    peak = _copy_gbs(time_us, device, 1 << (14 if args.smoke else 28))
    rows = []

    def copies(*tensors):
        """Per cold copy, a tuple of copies of ``tensors`` (the first is the originals)."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return list(zip(*(autotune.cold_copies_of(t, nbytes, cuda) for t in tensors)))

    def bench(fn, sets) -> float:
        """GPU microseconds of ``fn(*set)`` per call, over the cold copies ``sets``."""
        return time_us([lambda c=c: fn(*c) for c in sets])

    def row(kernel, shape, variant, config, us, dense_us, nbytes):
        gbs = nbytes / (us * 1e-6) / 1e9
        rows.append({"kernel": kernel, "shape": f"{shape[0]}x{shape[1]}", "variant": variant, "config": config,
                     "us": round(us, 2), "dense_us": round(dense_us, 2), "speedup": round(dense_us / us, 3),
                     "GB_s": round(gbs, 1), "frac_copy_bw": round(gbs / peak, 3)})

    def packed(w, bits):
        q = quantize_rtn(w.float().cpu(), QuantSpec(bits, 128))
        return tq.Packed(q.packed.to(device), q.scales.to(device), q.zeros.to(device), bits, 128), q.nbytes

    def packed_copies(*ps):
        """Cold copies of packed matrices (codes, scales and zeros copied)."""
        flat = [t for p in ps for t in (p.packed, p.scales, p.zeros)]
        return [tuple(tq.Packed(*c[3 * i:3 * i + 3], p.bits, p.group) for i, p in enumerate(ps))
                for c in copies(*flat)]

    for out_f, in_f in shapes:
        shape = (out_f, in_f)
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)
        wt = w.t().contiguous()
        wm = (w * (torch.rand_like(w, dtype=torch.float32) > 0.5)).t().contiguous()
        x = torch.randn(in_f, device=device, dtype=torch.bfloat16)
        ws, wts = copies(w), copies(wt, wm)
        blocked = copies(tt.block_layout(wt, BLOCKED_N), tt.block_layout(wm, BLOCKED_N))
        dense_us = min(bench(lambda w: F.linear(x, w), ws), bench(lambda w: F.linear(x[None], w), ws),
                       bench(lambda wt, wm: F.linear(x, wt.t()), wts))
        row("dense", shape, "F.linear bf16", "torch", dense_us, dense_us, w.numel() * 2)
        for config in configs if "tiered" in args.kernels else []:
            # heuristic: the launcher's default, passed explicitly; tuned: None, so the launcher reads the cache
            tcfg = tt.default_gemv_config(in_f, out_f) if config == "heuristic" else None
            for s in SPARSITIES:
                t = float(x.float().abs().quantile(s)) if s > 0 else 0.0
                us = bench(lambda wt, wm: tt.tiered_gemv(x, wt, None, t, t, config=tcfg), wts)
                row("tiered_gemv", shape, f"teal s={s:.2f}", config, us, dense_us, (1 - s) * wt.numel() * 2)
                # DAWS: the same kept fraction split in two tiers (half high, half medium)
                th = float(x.float().abs().quantile(min(0.99, s + (1 - s) / 2))) if s > 0 else 0.0
                us = bench(lambda wt, wm: tt.tiered_gemv(x, wt, wm, th, t, config=tcfg), wts)
                row("tiered_gemv", shape, f"daws s={s:.2f}", config, us, dense_us, (1 - s) * wt.numel() * 2)
                # the same over the blocked layout (each output block's rows contiguous)
                us = bench(lambda wt, wm: tt.tiered_gemv(x, wt, None, t, t, config=tcfg, n_out=out_f), blocked)
                row("tiered_gemv", shape, f"teal blocked s={s:.2f}", config, us, dense_us, (1 - s) * wt.numel() * 2)
                us = bench(lambda wt, wm: tt.tiered_gemv(x, wt, wm, th, t, config=tcfg, n_out=out_f), blocked)
                row("tiered_gemv", shape, f"daws blocked s={s:.2f}", config, us, dense_us, (1 - s) * wt.numel() * 2)
        del ws, wts, blocked
        if "banded" in args.kernels:
            xb, banded, ts = autotune.banded_inputs(in_f, out_f, device, torch.bfloat16)
            kept = sum(autotune.BANDED_TIER_SHARES)
            sets = copies(banded)
            # the same tiers as separate bf16 matrices (full weights + three mediums, zeros stored)
            separate = copies(*[tier_weight(banded.t(), j, torch.bfloat16).t().contiguous() for j in range(4)])
            for config in configs:
                bcfg = tt.default_gemv_config(in_f, out_f) if config == "heuristic" else None
                us = bench(lambda b: tt.banded_gemv(xb, b, ts, config=bcfg), sets)
                row("banded_gemv", shape, "mt3 e~0.50", config, us, dense_us, kept * banded.numel() * 2)
                us = bench(lambda b: tt.banded_gemv(xb, b, [0.0] * len(ts), config=bcfg), sets)
                row("banded_gemv", shape, "all rows", config, us, dense_us, banded.numel() * 2)
                us = bench(lambda *m: tt.multitier_gemv(xb, m[0], list(m[1:]), ts, config=bcfg), separate)
                row("multitier_gemv", shape, "mt3 e~0.50 separate", config, us, dense_us, kept * banded.numel() * 2)
            del sets, separate
        for n_keep, m_group in ((2, 4), (4, 8)) if "nm" in args.kernels else []:
            # magnitude N:M mask (keep the n largest of every m inputs), packed as values + uint8 in-group indices
            groups = w.reshape(out_f, -1, m_group)
            keep = groups.abs().argsort(-1, descending=True)[..., :n_keep]
            masked = torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(out_f, in_f)
            values, index = tn.pack_nm(masked, n_keep, m_group)
            us = bench(lambda v, i: tn.nm_matmul(x[None], v, i, n_keep, m_group), copies(values, index))
            row("nm_matmul", shape, f"{n_keep}:{m_group}", "heuristic", us, dense_us,
                values.numel() * values.element_size() + index.numel())
        xq = x[None]
        pa, a_bytes = packed(torch.randn(RANK, out_f), 4)
        pb, b_bytes = packed(torch.randn(RANK, in_f), 4)
        d = torch.ones(RANK, device=device, dtype=torch.float16)
        for bits in (4, 3) if "quant" in args.kernels else ():
            p, q_bytes = packed(w, bits)
            ps, dams = packed_copies(p), packed_copies(p, pa, pb)
            gemv = tq.gemv_eligible(1, p)
            for config in configs:
                heur = config == "heuristic"
                # the general kernel (tuned only where the GEMV kernel does not take the shape)
                if heur or not gemv:
                    qcfg = tq.default_config(1, in_f, out_f) if heur else None
                    us = bench(lambda p: tq.quant_matmul(xq, p, config=qcfg), ps)
                    row("quant_matmul", shape, f"int{bits} g128 qmm", config, us, dense_us, q_bytes)
                if gemv:
                    gcfg = tq.default_gemv_config(in_f, out_f) if heur else None
                    us = bench(lambda p: tq.quant_gemv(xq, p, config=gcfg), ps)
                    row("quant_matmul", shape, f"int{bits} g128 gemv", config, us, dense_us, q_bytes)

                def dam(p, pa, pb):   # what sparsefx::triton_lowrank_quant_linear launches for one token
                    proj = tq.quant_gemv(xq, pb, colscale=d, config=tq.default_gemv_config(in_f, RANK) if heur else None)
                    if gemv:
                        return tq.quant_gemv(xq, p, lowrank=(proj, pa),
                                             config=tq.default_gemv_config(in_f, out_f) if heur else None)
                    return tq.quant_matmul(xq, p, lowrank=(proj, pa),
                                           config=tq.default_config(1, in_f, out_f) if heur else None)

                us = bench(dam, dams)
                row("dam_fused", shape, f"int{bits} g128 + rank {RANK} int4", config, us, dense_us,
                    q_bytes + a_bytes + b_bytes)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpret"
    print_table(rows, f"Triton kernels on {gpu} (copy bandwidth {peak:.0f} GB/s)")
    stem = "kernel_triton_" + (f"{args.tag}_" if args.tag else "") + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    tuned = "re-tuned" if args.tune else "from the cache" if args.cached else "no"
    write_results(args.out, stem, rows, run_meta(device=gpu, copy_gbs=round(peak, 1), tuned=tuned))


if __name__ == "__main__":
    main()
