"""Shared Triton JIT helpers: the output tile a program of a 2-D grid owns; writing a program's result."""

import triton
import triton.language as tl


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows and columns of this program's [BLOCK_M, BLOCK_N] tile of y, and which of them exist
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, n, m < M, n < N


@triton.jit
def write(ptrs, acc, mask, ATOMIC: tl.constexpr):
    # a program's fp32 result: added atomically when K is split between programs (never bf16 atomics), else stored
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)
