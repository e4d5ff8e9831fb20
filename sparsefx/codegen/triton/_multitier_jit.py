"""Triton JIT kernel of ``multitier.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from ._tile_jit import write


@triton.jit
def tier_product(acc, ptr, s_k, s_n, k, n, n_ok, x, rows):
    # acc + sum over the rows of this tier of x[k] * W[k, n]; the other rows are masked out of the load (not fetched)
    w = tl.load(ptr + k[:, None] * s_k + n[None, :] * s_n, mask=rows[:, None] & n_ok[None, :], other=0.0,
                eviction_policy="evict_first")
    return acc + tl.sum(w.to(tl.float32) * tl.where(rows, x, 0.0)[:, None], axis=0)


@triton.jit
def gemv(x_ptr, wt_ptr, m1_ptr, m2_ptr, m3_ptr, y_ptr, K, N, t0, t1, t2, t3, sw_k, sw_n, s1_k, s1_n, s2_k, s2_n,
         s3_k, s3_n, k_chunk, N_T: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n] (+)= sum over this program's k of x[k] * (the matrix of x[k]'s tier)[k, n]; one program = BLOCK_N outputs
    # x k_chunk inputs. Tier 0 reads Wt, tier j the j-th medium; the tiers are exclusive, so each kept row is fetched
    # once, from its own matrix (which may differ in dtype: fp32 weights beside fp16 mediums).
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = tl.program_id(1) * k_chunk
    for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k < K) & (k < k_begin + k_chunk)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.abs(x)
        # the tier: how many (descending) thresholds |x| stays below — 0: full weights ... N_T: dropped
        tier = (a < t0).to(tl.int32) + (a < t1).to(tl.int32)
        if N_T > 2:
            tier += (a < t2).to(tl.int32)
        if N_T > 3:
            tier += (a < t3).to(tl.int32)
        acc = tier_product(acc, wt_ptr, sw_k, sw_n, k, n, n_ok, x, k_ok & (tier == 0))
        acc = tier_product(acc, m1_ptr, s1_k, s1_n, k, n, n_ok, x, k_ok & (tier == 1))
        if N_T > 2:
            acc = tier_product(acc, m2_ptr, s2_k, s2_n, k, n, n_ok, x, k_ok & (tier == 2))
        if N_T > 3:
            acc = tier_product(acc, m3_ptr, s3_k, s3_n, k, n, n_ok, x, k_ok & (tier == 3))
    write(y_ptr + n, acc, n_ok, ATOMIC)
