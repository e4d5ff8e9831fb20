"""Triton JIT kernel of ``banded.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from ._tile_jit import write


@triton.jit
def gemv(x_ptr, wt_ptr, y_ptr, K, N, t0, t1, t2, t3, sw_k, sw_n, k_chunk, N_T: tl.constexpr, ATOMIC: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n] (+)= sum over this program's k of x[k] * Wt[k, n] where Wt[k, n]'s band reaches x[k]'s tier; one program
    # = BLOCK_N outputs x k_chunk inputs. Thresholds t0 >= t1 >= ... (N_T of them, the unused ones ignored).
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = tl.program_id(1) * k_chunk
    for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k < K) & (k < k_begin + k_chunk)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.abs(x)
        # the tier: how many (descending) thresholds |x| stays below — 0: all weights ... N_T: dropped
        tier = (a < t0).to(tl.int32) + (a < t1).to(tl.int32)
        if N_T > 2:
            tier += (a < t2).to(tl.int32)
        if N_T > 3:
            tier += (a < t3).to(tl.int32)
        kept = k_ok & (tier < N_T)
        # dropped rows are not fetched; weights are read once (evict first)
        w = tl.load(wt_ptr + k[:, None] * sw_k + n[None, :] * sw_n, mask=kept[:, None] & n_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        band = (w.to(tl.int16, bitcast=True) & 3).to(tl.int32)       # the two low mantissa bits
        w = tl.where(band >= tier[:, None], w.to(tl.float32), 0.0)
        acc += tl.sum(w * tl.where(kept, x, 0.0)[:, None], axis=0)
    write(y_ptr + n, acc, n_ok, ATOMIC)
