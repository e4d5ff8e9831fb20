"""Triton kernels vs torch dense (cuBLAS) on a GPU, ratios from one run; bandwidth achieved.

    python bench/kernel_triton.py                    # needs CUDA; writes bench/results/kernel_triton_<gpu>.csv/.json

Decode shapes (batch 1) of DEVELOPERS.md, weights in bf16 (tiered) or packed codes (quant):
  * tiered GEMV (TEAL-style single tier and DAWS's two tiers) at 0/40/50/75 % activation sparsity vs ``F.linear``;
  * dequant GEMV at 4 and 3 bits (group 128, asymmetric) and DAM's fused low-rank epilogue (rank 64) vs bf16
    ``F.linear``.
Times are medians of ``triton.testing.do_bench`` (which flushes the L2 cache between calls: weights come from HBM, as
in decode). Bandwidth = bytes the kernel must read / time, also as a fraction of a device-to-device copy's rate
(the achievable peak, measured in the same run). Each kernel runs with its autotune-cache config when
``sparsefx autotune`` has filled it, else its heuristic.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch.nn import functional as F

from sparsefx.experiments import print_table, run_meta, write_results

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]     # [out, in]
SPARSITIES = [0.0, 0.4, 0.5, 0.75]


def _copy_gbs(do_bench) -> float:
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_triton.py needs a CUDA GPU (the CPU numbers are in bench/kernel_sparse_gemv.py)")
    from triton.testing import do_bench

    from sparsefx.codegen.triton.quant import Packed, quant_matmul
    from sparsefx.codegen.triton.tiered import tiered_gemv
    from sparsefx.ir.qformat import QuantSpec
    from sparsefx.passes.quant import quantize_rtn

    peak = _copy_gbs(do_bench)
    rows = []

    def row(kernel, shape, variant, us, dense_us, nbytes):
        gbs = nbytes / (us * 1e-6) / 1e9
        rows.append({"kernel": kernel, "shape": f"{shape[0]}x{shape[1]}", "variant": variant, "us": round(us, 2),
                     "dense_us": round(dense_us, 2), "speedup": round(dense_us / us, 3), "GB_s": round(gbs, 1),
                     "frac_copy_bw": round(gbs / peak, 3)})

    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        wt = w.t().contiguous()
        wm = (w * (torch.rand_like(w, dtype=torch.float32) > 0.5)).t().contiguous()
        x = torch.randn(in_f, device="cuda", dtype=torch.bfloat16)
        dense_us = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3
        for s in SPARSITIES:
            t = float(x.float().abs().quantile(s)) if s > 0 else 0.0
            us = do_bench(lambda: tiered_gemv(x, wt, None, t, t), return_mode="median") * 1e3
            row("tiered_gemv", (out_f, in_f), f"teal s={s:.2f}", us, dense_us, (1 - s) * wt.numel() * 2)
            # DAWS: the same kept fraction split in two tiers (half high, half medium)
            th = float(x.float().abs().quantile(min(0.99, s + (1 - s) / 2))) if s > 0 else 0.0
            us = do_bench(lambda: tiered_gemv(x, wt, wm, th, t), return_mode="median") * 1e3
            row("tiered_gemv", (out_f, in_f), f"daws s={s:.2f}", us, dense_us, (1 - s) * wt.numel() * 2)
        xq = x[None]
        for bits in (4, 3):
            qw = quantize_rtn(w.float().cpu(), QuantSpec(bits, 128))
            p = Packed(qw.packed.cuda(), qw.scales.cuda(), qw.zeros.cuda(), bits, 128)
            us = do_bench(lambda: quant_matmul(xq, p), return_mode="median") * 1e3
            row("quant_matmul", (out_f, in_f), f"int{bits} g128", us, dense_us, qw.nbytes)
            r = 64
            at = quantize_rtn(torch.randn(r, out_f), QuantSpec(4, 128))
            b = quantize_rtn(torch.randn(r, in_f), QuantSpec(4, 128))
            pa = Packed(at.packed.cuda(), at.scales.cuda(), at.zeros.cuda(), 4, 128)
            pb = Packed(b.packed.cuda(), b.scales.cuda(), b.zeros.cuda(), 4, 128)
            d = torch.ones(r, device="cuda", dtype=torch.float16)

            def dam():
                tproj = quant_matmul(xq, pb, colscale=d)
                return quant_matmul(xq, p, lowrank=(tproj, pa))

            us = do_bench(dam, return_mode="median") * 1e3
            row("dam_fused", (out_f, in_f), f"int{bits} g128 + rank {r} int4", us, dense_us,
                qw.nbytes + at.nbytes + b.nbytes)
    gpu = torch.cuda.get_device_name()
    print_table(rows, f"Triton kernels on {gpu} (copy bandwidth {peak:.0f} GB/s)")
    stem = "kernel_triton_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    write_results(args.out, stem, rows, run_meta(device=gpu, copy_gbs=round(peak, 1)))


if __name__ == "__main__":
    main()
