"""Batch-1 linear over packed quantized weights on CPU vs the best dense fp32 path, cold weights, one run.

    python bench/kernel_quant_gemv.py            # shapes of DEVELOPERS.md, 8/4/3/2 bits, group 64 asymmetric

Variants per shape: dense fp32 (the fastest of ``harness.dense_gemv_calls``: torch.mv, F.linear, F.linear over the
transposed copy), the op's default implementation (dequantize the whole weight, then F.linear — what ran before the
kernel), and the C++ kernel that multiplies straight from the packed codes (``sparsefx/ops/quant/cpu.py``) at
each bit width, and its int8-activation twin (``quant_matmul_q8``: x rounded to int8 per 32 inputs, codes multiplied
as bytes; columns ``q8_*``). "Cold": every call uses the next of several weight copies that together exceed the last-level cache,
as in decode. Variants are timed interleaved (``harness.interleaved_medians``). Packed codes are random
bytes (every bit pattern is a valid code), scales random fp16: the kernel's work does not depend on the values.
Writes bench/results/kernel_quant_gemv.csv and .json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsefx.ops.quant.cpu import (extension, quant_matmul, quant_matmul_q8, quant_matmul_q8_reference, quant_matmul_reference)
from sparsefx.ops.quant.op import quant_linear_math
from sparsefx.ops.quant.format import QuantSpec

from harness import (KERNEL_SHAPES, best_dense, cold_copies, cold_weights, dense_gemv_calls, interleaved_medians,
                     kernel_bench_parser, run_meta, write_results)

BITS = [8, 4, 3, 2]


def _random_packed(out_f: int, in_f: int, spec: QuantSpec, gen: torch.Generator):
    groups = in_f // spec.group_size
    packed = torch.randint(0, 256, (out_f, in_f * spec.bits // 8), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(out_f, groups, generator=gen) * 0.01 + 1e-3).half()
    zeros = None if spec.symmetric else torch.randint(0, 2 ** spec.bits, (out_f, groups), dtype=torch.uint8,
                                                      generator=gen)
    return packed, scales, zeros


def main() -> None:
    ap = kernel_bench_parser(Path(__file__).parent / "results")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--rows", type=int, default=1, help="tokens per call (decode: 1)")
    args = ap.parse_args()
    if extension() is None:
        raise SystemExit("the C++ kernel did not build; nothing to benchmark")
    rows = []
    for out_f, in_f in KERNEL_SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.rows, in_f, generator=gen)
        ws, wts, nxt_dense = cold_weights(out_f, in_f, cold_copies(out_f * in_f * 4), gen)
        state: dict = {}

        def nxt(key, n):
            state[key] = (state.get(key, 0) + 1) % n
            return state[key]

        fns = dense_gemv_calls(x, ws, wts, nxt_dense)
        packs = {}
        for bits in BITS:
            spec = QuantSpec(bits, args.group_size, args.symmetric)
            n = cold_copies(out_f * in_f * spec.bits_per_weight / 8)
            packs[bits] = [_random_packed(out_f, in_f, spec, gen) for _ in range(n)]
            p0 = packs[bits][0]
            torch.testing.assert_close(quant_matmul(x, *p0, bits, args.group_size),
                                       quant_matmul_reference(x, *p0, bits, args.group_size), rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(quant_matmul_q8(x, *p0, bits, args.group_size).double(),
                                       quant_matmul_q8_reference(x, *p0, bits, args.group_size), rtol=1e-4, atol=1e-3)
            fns[f"kernel{bits}"] = lambda b=bits, n=n: quant_matmul(x, *packs[b][nxt(b, n)], b, args.group_size)
            fns[f"q8_{bits}"] = lambda b=bits, n=n: quant_matmul_q8(x, *packs[b][nxt(b, n)], b, args.group_size)
        # the default implementation dequantizes per call: time it at 4 bits only (its cost hardly depends on bits)
        fns["dequant4"] = lambda: quant_linear_math(x, *packs[4][nxt(4, len(packs[4]))], None, 4, args.group_size)
        t = interleaved_medians(fns, args.reps)
        dense, dense_call = best_dense(t)
        for bits in BITS:
            spec = QuantSpec(bits, args.group_size, args.symmetric)
            weight_bytes = out_f * in_f * spec.bits_per_weight / 8
            rows.append({"out": out_f, "in": in_f, "bits": bits, "group_size": args.group_size,
                         "symmetric": args.symmetric, "tokens": args.rows,
                         "dense_ms": round(dense * 1e3, 4), "best_dense": dense_call, "kernel_ms": round(t[f"kernel{bits}"] * 1e3, 4),
                         "speedup_vs_dense": round(dense / t[f"kernel{bits}"], 3),
                         "ideal_speedup": round(32 / spec.bits_per_weight, 3),
                         "dequant_then_linear_ms": round(t["dequant4"] * 1e3, 4) if bits == 4 else None,
                         "kernel_GBps": round(weight_bytes / t[f"kernel{bits}"] / 1e9, 2),
                         "q8_ms": round(t[f"q8_{bits}"] * 1e3, 4),
                         "q8_speedup_vs_dense": round(dense / t[f"q8_{bits}"], 3),
                         "q8_vs_fp32_kernel": round(t[f"kernel{bits}"] / t[f"q8_{bits}"], 3),
                         "q8_GBps": round(weight_bytes / t[f"q8_{bits}"] / 1e9, 2),
                         "dense_GBps": round(out_f * in_f * 4 / dense / 1e9, 2)})
            print(rows[-1], flush=True)
        del ws, wts, packs
    write_results(args.out, "kernel_quant_gemv" + (f"_m{args.rows}" if args.rows != 1 else ""), rows,
                  run_meta(reps=args.reps, group_size=args.group_size, symmetric=args.symmetric, rows=args.rows))


if __name__ == "__main__":
    main()
