"""Triton JIT kernels of ``triton.py`` (module level, so one kernel can call another; imported lazily)."""

import triton
import triton.language as tl

from .._tile_jit import output_tile, write


@triton.jit
def dequant(p_ptr, s_ptr, z_ptr, row, col, mask, p_stride, n_groups, BITS: tl.constexpr, GROUP: tl.constexpr,
            SYM: tl.constexpr):
    # element (row, col) of a matrix stored packed along its rows (row, col: broadcastable index tensors)
    if BITS == 16:
        val = tl.load(p_ptr + row * p_stride + col, mask=mask, other=0.0).to(tl.float32)
    else:
        bit = col * BITS
        byte = bit // 8
        word = tl.load(p_ptr + row * p_stride + byte, mask=mask, other=0).to(tl.int32)
        if BITS == 3:   # a 3-bit code may continue in the next byte
            nxt = tl.load(p_ptr + row * p_stride + byte + 1, mask=mask & (byte + 1 < p_stride), other=0)
            word = word | (nxt.to(tl.int32) << 8)
        code = (word >> (bit % 8)) & ((1 << BITS) - 1)
        g = row * n_groups + col // GROUP
        scale = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        if SYM:
            val = (code - (1 << (BITS - 1))).to(tl.float32) * scale
        else:
            zero = tl.load(z_ptr + g, mask=mask, other=0).to(tl.int32)
            val = (code - zero).to(tl.float32) * scale
    return val


@triton.jit
def qmm(x_ptr, y_ptr, M, N, K, sx_m,
        p_ptr, s_ptr, z_ptr, p_stride, n_groups,
        t_ptr, R, st_m, ap_ptr, as_ptr, az_ptr, a_stride, a_groups,
        cs_ptr, bias_ptr, k_chunk,
        BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, HAS_MAIN: tl.constexpr,
        A_BITS: tl.constexpr, A_GROUP: tl.constexpr, A_SYM: tl.constexpr, HAS_LR: tl.constexpr,
        HAS_COLSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m, n, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_MAIN:
        k_begin = pid_k * k_chunk
        for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = (k < K) & (k < k_begin + k_chunk)
            x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)                                    # [BM, BK]
            w = dequant(p_ptr, s_ptr, z_ptr, n[None, :], k[:, None], k_ok[:, None] & n_ok[None, :], p_stride,
                        n_groups, BITS, GROUP, SYM)                                   # [BK, BN] = deq(P)^T
            if USE_DOT:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if HAS_COLSCALE:
            acc *= tl.load(cs_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if pid_k == 0:
        if HAS_LR:
            for j0 in range(0, R, BLOCK_K):
                j = j0 + tl.arange(0, BLOCK_K)
                j_ok = j < R
                t = tl.load(t_ptr + m[:, None] * st_m + j[None, :], mask=m_ok[:, None] & j_ok[None, :],
                            other=0.0).to(tl.float32)                                # [BM, BR]
                a = dequant(ap_ptr, as_ptr, az_ptr, j[:, None], n[None, :], j_ok[:, None] & n_ok[None, :],
                            a_stride, a_groups, A_BITS, A_GROUP, A_SYM)               # [BR, BN] = deq(A^T)
                if USE_DOT:
                    acc += tl.dot(t, a, input_precision="ieee")
                else:
                    acc += tl.sum(t[:, :, None] * a[None, :, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + m[:, None] * N + n[None, :]
    write(ptrs, acc, m_ok[:, None] & n_ok[None, :], ATOMIC)


@triton.jit
def qgemv(x_ptr, y_ptr, N, K, p_ptr, s_ptr, z_ptr, p_stride, n_groups,
          t_ptr, R, ap_ptr, as_ptr, az_ptr, a_stride, a_groups, cs_ptr, bias_ptr, k_chunk,
          BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
          A_BITS: tl.constexpr, A_GROUP: tl.constexpr, A_SYM: tl.constexpr, HAS_LR: tl.constexpr,
          HAS_COLSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one token: y[n] = colscale[n] * sum_g scale[n, g] * (sum_{k in g} x[k] code[n, k] - zero[n, g] sum_{k in g} x[k])
    #                   (+ t deq(A^T)[:, n] + bias[n] in the first K split)
    # Codes are read in whole units, [BLOCK_N, NB] per step (one coalesced segment per row): a unit is a byte, or
    # for 3-bit codes three bytes (eight codes) joined into one 24-bit word. Unit j of the step holds codes
    # PER * j + i at bit i * BITS, so code plane i multiplies x[k0 + PER * j + i] (a strided load of the small,
    # cached x). GPB groups per step (BLOCK_K >= GROUP) or one group over several steps.
    PER: tl.constexpr = 8 if BITS == 3 else 8 // BITS
    NB: tl.constexpr = BLOCK_K // PER
    GPB: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(K, k_begin + k_chunk)
    j = tl.arange(0, NB)
    for k0 in range(k_begin, k_end, BLOCK_K):
        byte_ok = k0 + PER * j < k_end
        unit_ok = n_ok[:, None] & byte_ok[None, :]
        if BITS == 3:   # the three bytes of each unit: the second and third loads hit the lines the first fetched
            u = p_ptr + n[:, None] * p_stride + (3 * (k0 // PER + j))[None, :]
            b = tl.load(u, mask=unit_ok, other=0, eviction_policy="evict_first").to(tl.int32)
            b = b | (tl.load(u + 1, mask=unit_ok, other=0, eviction_policy="evict_first").to(tl.int32) << 8)
            b = b | (tl.load(u + 2, mask=unit_ok, other=0, eviction_policy="evict_first").to(tl.int32) << 16)
        else:
            b = tl.load(p_ptr + n[:, None] * p_stride + (k0 // PER + j)[None, :],
                        mask=unit_ok, other=0, eviction_policy="evict_first").to(tl.int32)
        prod = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
        xs = tl.zeros([NB], dtype=tl.float32)
        for i in tl.static_range(PER):
            xi = tl.load(x_ptr + k0 + PER * j + i, mask=byte_ok, other=0.0).to(tl.float32)
            prod += ((b >> (i * BITS)) & MASK).to(tl.float32) * xi[None, :]
            xs += xi
        part = tl.sum(tl.reshape(prod, (BLOCK_N, GPB, NB // GPB)), axis=2)           # [BN, GPB]
        xsum = tl.sum(tl.reshape(xs, (GPB, NB // GPB)), axis=1)                       # [GPB]
        g = k0 // GROUP + tl.arange(0, GPB)
        g_ok = n_ok[:, None] & (g < n_groups)[None, :]
        scale = tl.load(s_ptr + n[:, None] * n_groups + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
        if SYM:
            zero = (1 << (BITS - 1)) * 1.0
        else:
            zero = tl.load(z_ptr + n[:, None] * n_groups + g[None, :], mask=g_ok, other=0).to(tl.float32)
        acc += tl.sum(scale * (part - zero * xsum[None, :]), axis=1)
    if HAS_COLSCALE:
        acc *= tl.load(cs_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if pid_k == 0:
        if HAS_LR:
            for j0 in range(0, R, 16):
                jr = j0 + tl.arange(0, 16)
                jr_ok = jr < R
                t = tl.load(t_ptr + jr, mask=jr_ok, other=0.0).to(tl.float32)
                a = dequant(ap_ptr, as_ptr, az_ptr, jr[:, None], n[None, :], jr_ok[:, None] & n_ok[None, :],
                            a_stride, a_groups, A_BITS, A_GROUP, A_SYM)               # [16, BN] = deq(A^T)
                acc += tl.sum(t[:, None] * a, axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    write(y_ptr + n, acc, n_ok, ATOMIC)
