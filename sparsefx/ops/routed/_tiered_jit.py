"""Triton JIT kernels of ``triton.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from .._tile_jit import output_tile, write


@triton.jit
def column_block(N, sw_n, sw_b, swm_n, swm_b, BLOCK_N: tl.constexpr):
    # a GEMV program's K split, its outputs n (and which exist), and their column offsets in W.T and W_medium.T:
    # n * s_n in the plain layout (s_b = BLOCK_N * s_n); in the blocked layout ([out blocks, in, BLOCK_N],
    # ``block_layout``) a block's rows are contiguous
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_n * sw_b + tl.arange(0, BLOCK_N) * sw_n
    cols_m = pid_n * swm_b + tl.arange(0, BLOCK_N) * swm_n
    return tl.program_id(1), n, n < N, cols, cols_m


@triton.jit
def gemv(x_ptr, wt_ptr, wmt_ptr, y_ptr, K, N, t_high, t_low, sw_k, sw_n, sw_b, swm_k, swm_n, swm_b, k_chunk,
         HAS_MEDIUM: tl.constexpr, SAME_DTYPE: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    # y[n] (+)= sum over this program's k of tiered x[k] * Wt[k, n]; one program = BLOCK_N outputs x k_chunk
    pid_k, n, n_ok, cols, cols_m = column_block(N, sw_n, sw_b, swm_n, swm_b, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * k_chunk
    for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k < K) & (k < k_begin + k_chunk)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.abs(x)
        if HAS_MEDIUM and SAME_DTYPE:
            # one load per kept row, from the matrix of its tier (the tiers are exclusive): the registers and
            # instructions of a single tier
            kept = k_ok & (a >= t_low)
            ptrs = tl.where((a >= t_high)[:, None], wt_ptr + k[:, None] * sw_k + cols[None, :],
                            wmt_ptr + k[:, None] * swm_k + cols_m[None, :])
        else:
            kept = k_ok & (a >= t_high)
            ptrs = wt_ptr + k[:, None] * sw_k + cols[None, :]
        # masked rows are not fetched: the saving of activation sparsity; weights are read once (evict first)
        w = tl.load(ptrs, mask=kept[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += tl.sum(w.to(tl.float32) * tl.where(kept, x, 0.0)[:, None], axis=0)
        if HAS_MEDIUM and not SAME_DTYPE:   # medium weights in another dtype: their own load
            medium = k_ok & (a >= t_low) & (a < t_high)
            wm = tl.load(wmt_ptr + k[:, None] * swm_k + cols_m[None, :], mask=medium[:, None] & n_ok[None, :],
                         other=0.0, eviction_policy="evict_first")
            acc += tl.sum(wm.to(tl.float32) * tl.where(medium, x, 0.0)[:, None], axis=0)
    write(y_ptr + n, acc, n_ok, ATOMIC)


@triton.jit
def compact(x_ptr, idx_ptr, count_ptr, K, t_low, BLOCK: tl.constexpr):
    # one program: the kept channels (|x| >= t_low) in ascending order into idx, their number into count
    total = 0
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        keep = (k < K) & (tl.abs(tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)) >= t_low)
        pos = total + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + pos, k, mask=keep)
        total += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr, total)


@triton.jit
def gemv_gather(x_ptr, idx_ptr, count_ptr, wt_ptr, wmt_ptr, y_ptr, N, t_high, sw_k, sw_n, sw_b, swm_k, swm_n,
                swm_b, HAS_MEDIUM: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n] (+)= sum over this program's share of the kept channels idx[:count] of x[k] * (Wt or Wmt)[k, n]:
    # every loaded row is a kept one, so a program's loop is as long as its share of the kept rows
    pid_k, n, n_ok, cols, cols_m = column_block(N, sw_n, sw_b, swm_n, swm_b, BLOCK_N)
    count = tl.load(count_ptr)
    chunk = tl.cdiv(tl.cdiv(count, SPLIT), BLOCK_K) * BLOCK_K
    begin = pid_k * chunk
    end = tl.minimum(count, begin + chunk)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(begin, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < end
        k = tl.load(idx_ptr + j, mask=j_ok, other=0)
        x = tl.load(x_ptr + k, mask=j_ok, other=0.0).to(tl.float32)
        if HAS_MEDIUM:
            ptrs = tl.where((tl.abs(x) >= t_high)[:, None], wt_ptr + k[:, None] * sw_k + cols[None, :],
                            wmt_ptr + k[:, None] * swm_k + cols_m[None, :])
        else:
            ptrs = wt_ptr + k[:, None] * sw_k + cols[None, :]
        w = tl.load(ptrs, mask=j_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += tl.sum(w.to(tl.float32) * x[:, None], axis=0)
    write(y_ptr + n, acc, n_ok, ATOMIC)


@triton.jit
def gemm(x_ptr, idx_ptr, wt_ptr, wmt_ptr, y_ptr, M, N, n_idx, t_high, t_low, sx_m, sw_k, sw_n, swm_k, swm_n,
         HAS_MEDIUM: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    # y[m, n] = sum over the kept channels idx of tiered x[m, k] * Wt[k, n]
    m, n, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, n_idx, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < n_idx
        k = tl.load(idx_ptr + j, mask=j_ok, other=0)
        x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        a = tl.abs(x)
        w = tl.load(wt_ptr + k[:, None] * sw_k + n[None, :] * sw_n, mask=j_ok[:, None] & n_ok[None, :],
                    other=0.0).to(x.dtype)
        xh = tl.where(a >= t_high, x, 0.0)
        if IEEE:   # fp32 inputs: exact fp32 products, as the reference (tf32 would lose 13 mantissa bits)
            acc += tl.dot(xh, w, input_precision="ieee")
        else:
            acc += tl.dot(xh, w)
        if HAS_MEDIUM:
            wm = tl.load(wmt_ptr + k[:, None] * swm_k + n[None, :] * swm_n, mask=j_ok[:, None] & n_ok[None, :],
                         other=0.0).to(x.dtype)
            xm = tl.where((a >= t_low) & (a < t_high), x, 0.0)
            if IEEE:
                acc += tl.dot(xm, wm, input_precision="ieee")
            else:
                acc += tl.dot(xm, wm)
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
