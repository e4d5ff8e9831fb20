"""Shared Triton JIT helper: the output tile a program of a 2-D grid owns."""

import triton
import triton.language as tl


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows and columns of this program's [BLOCK_M, BLOCK_N] tile of y, and which of them exist
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, n, m < M, n < N
