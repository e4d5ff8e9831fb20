"""Shared Triton JIT helpers: the output tile a program of a 2-D grid owns; one slice of a routed GEMV's inputs;
writing a program's result."""

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


@triton.jit
def gemv_program(N, k_chunk, BLOCK_N: tl.constexpr):
    # a split-K GEMV program of a (out blocks, K splits) grid: its outputs n (and which exist), a zero fp32
    # accumulator, and where its K split begins
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return n, n < N, tl.zeros([BLOCK_N], dtype=tl.float32), tl.program_id(1) * k_chunk


@triton.jit
def routed_inputs(x_ptr, k0, k_begin, k_chunk, K, t0, t1, t2, t3, N_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # one BLOCK_K slice of a multi-threshold GEMV's inputs: indices k (and which lie in this program's K split),
    # x[k] as fp32 and its tier under the descending thresholds t0 >= t1 >= ... (N_T of them): how many of them |x|
    # stays below — 0: the full weights ... N_T: dropped
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = (k < K) & (k < k_begin + k_chunk)
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    a = tl.abs(x)
    tier = (a < t0).to(tl.int32) + (a < t1).to(tl.int32)
    if N_T > 2:
        tier += (a < t2).to(tl.int32)
    if N_T > 3:
        tier += (a < t3).to(tl.int32)
    return k, k_ok, x, tier
