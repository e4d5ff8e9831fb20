"""Triton JIT kernel of ``triton.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from .._tile_jit import gemv_program, routed_inputs, write


@triton.jit
def gemv(x_ptr, wt_ptr, y_ptr, K, N, t0, t1, t2, t3, sw_k, sw_n, k_chunk, N_T: tl.constexpr, ATOMIC: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n] (+)= sum over this program's k of x[k] * Wt[k, n] where Wt[k, n]'s band reaches x[k]'s tier; one program
    # = BLOCK_N outputs x k_chunk inputs. Thresholds t0 >= t1 >= ... (N_T of them, the unused ones ignored).
    n, n_ok, acc, k_begin = gemv_program(N, k_chunk, BLOCK_N)
    for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
        k, k_ok, x, tier = routed_inputs(x_ptr, k0, k_begin, k_chunk, K, t0, t1, t2, t3, N_T, BLOCK_K)
        kept = k_ok & (tier < N_T)
        # dropped rows are not fetched; weights are read once (evict first)
        w = tl.load(wt_ptr + k[:, None] * sw_k + n[None, :] * sw_n, mask=kept[:, None] & n_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        band = (w.to(tl.int16, bitcast=True) & 3).to(tl.int32)       # the two low mantissa bits
        w = tl.where(band >= tier[:, None], w.to(tl.float32), 0.0)
        acc += tl.sum(w * tl.where(kept, x, 0.0)[:, None], axis=0)
    write(y_ptr + n, acc, n_ok, ATOMIC)
