"""Triton JIT kernel of ``triton.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from .._tile_jit import gemv_program, routed_inputs, write


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
    n, n_ok, acc, k_begin = gemv_program(N, k_chunk, BLOCK_N)
    for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
        k, k_ok, x, tier = routed_inputs(x_ptr, k0, k_begin, k_chunk, K, t0, t1, t2, t3, N_T, BLOCK_K)
        acc = tier_product(acc, wt_ptr, sw_k, sw_n, k, n, n_ok, x, k_ok & (tier == 0))
        acc = tier_product(acc, m1_ptr, s1_k, s1_n, k, n, n_ok, x, k_ok & (tier == 1))
        if N_T > 2:
            acc = tier_product(acc, m2_ptr, s2_k, s2_n, k, n, n_ok, x, k_ok & (tier == 2))
        if N_T > 3:
            acc = tier_product(acc, m3_ptr, s3_k, s3_n, k, n, n_ok, x, k_ok & (tier == 3))
    write(y_ptr + n, acc, n_ok, ATOMIC)
