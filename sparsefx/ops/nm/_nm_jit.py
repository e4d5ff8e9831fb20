"""Triton JIT kernel of ``triton.py`` (module level, as Triton resolves names; imported lazily)."""

import triton
import triton.language as tl

from .._tile_jit import output_tile, write


@triton.jit
def nm_mm(x_ptr, v_ptr, i_ptr, y_ptr, b_ptr, M, N, KEPT, K, j_chunk, N_KEEP: tl.constexpr, M_GROUP: tl.constexpr,
          HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_J: tl.constexpr):
    # y[m, n] (+)= sum over this program's j of values[n, j] * x[m, (j // N_KEEP) * M_GROUP + index[n, j]]
    m, n, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    pid_j = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    j_begin = pid_j * j_chunk
    j_end = tl.minimum(KEPT, j_begin + j_chunk)
    for j0 in range(j_begin, j_end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < j_end
        wmask = n_ok[:, None] & j_ok[None, :]
        v = tl.load(v_ptr + n[:, None] * KEPT + j[None, :], mask=wmask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)                                   # [BN, BJ]
        idx = tl.load(i_ptr + n[:, None] * KEPT + j[None, :], mask=wmask, other=0,
                      eviction_policy="evict_first").to(tl.int32)
        col = (j[None, :] // N_KEEP) * M_GROUP + idx                                                # [BN, BJ]
        # gather the inputs each kept weight multiplies: [BM, BN, BJ]
        xg = tl.load(x_ptr + m[:, None, None] * K + col[None, :, :],
                     mask=m_ok[:, None, None] & wmask[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * v[None, :, :], axis=2)
    if HAS_BIAS:
        if pid_j == 0:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + m[:, None] * N + n[None, :]
    write(ptrs, acc, m_ok[:, None] & n_ok[None, :], ATOMIC)
