"""Dequantize-and-multiply over the packed format of ``ops/quant/format.py``, with DAM's low-rank epilogue fused.

One kernel computes

    y[m, n] = colscale[n] * sum_k x[m, k] * deq(P)[n, k]          (main: a quantized weight, groups along k)
            + sum_j t[m, j] * deq(At)[j, n]                         (optional low-rank epilogue, groups along n)
            + bias[n]

``deq`` reads ``bits``-bit codes straight from the packed little-endian bit stream (a code at bit ``c * bits`` of its
row; 3-bit codes may straddle two bytes) with the group's fp16 scale and uint8 zero (symmetric: ``2**(bits-1)``);
``bits = 16`` means the matrix is stored as plain fp16. Nothing is dequantized to memory: weights travel as codes,
which is the point of a quantized GEMV (4-bit codes are a quarter of fp16's bytes).

``sparsefx::lowrank_quant_linear`` (``y = x deq(Q)^T + ((x deq(B)^T) * d) deq(A^T) + b``) takes two launches: the
rank-r projection ``t = (x deq(B)^T) * d`` (``colscale = d``), then the main product with ``t deq(A^T)`` fused as
the epilogue. ``sparsefx::quant_linear`` is the main product alone.

One token (decode) with 2/3/4/8-bit codes in power-of-two groups takes the GEMV kernel ``quant_gemv``: each program
owns ``BLOCK_N`` weight rows and reads their codes in whole units (bytes; for 3-bit codes, three bytes joined into
one word of eight codes), one coalesced segment per row, splits them in registers, dots them with x per group and
applies scale and zero once per group (``sum scale * (x.codes - zero * sum x)``). Everything else (groups of
96/192, several rows) takes the general kernel ``qmm``, which dequantizes element by element: broadcast-and-sum for
a few rows, ``tl.dot`` beyond (it needs 16 rows).
A ``SPLIT_K`` > 1 splits the K loop between programs that add fp32 partial sums with atomics (the epilogue and
bias are added by the first split only).
"""

from __future__ import annotations

import torch

from ..triton_support import check_device, k_chunks, output_buffer, splits_for
from ..tuning import lookup
from .format import dequantize_packed


def _kernel(name: str = "qmm"):
    from . import _quant_jit   # lazy: the JIT module imports triton

    return getattr(_quant_jit, name)


class Packed:
    """A matrix as the kernel reads it: ``packed`` (uint8 codes, or the fp16 matrix when ``bits == 16``), fp16
    ``scales``, uint8 ``zeros`` (None: symmetric), ``bits``, ``group_size``, and its logical ``[rows, cols]``."""

    def __init__(self, packed, scales, zeros, bits: int, group_size: int):
        self.packed, self.scales, self.zeros, self.bits, self.group = packed, scales, zeros, int(bits), int(group_size)
        self.rows = packed.shape[0]
        self.cols = packed.shape[1] if self.bits == 16 else packed.shape[1] * 8 // self.bits
        if self.bits != 16:
            if packed.dtype != torch.uint8 or scales is None or scales.shape != (self.rows, self.cols // self.group):
                raise ValueError(f"packed matrix {tuple(packed.shape)} ({packed.dtype}) with scales "
                                 f"{None if scales is None else tuple(scales.shape)} is not {self.bits}-bit codes in "
                                 f"groups of {self.group}")
            if zeros is not None and zeros.shape != scales.shape:
                raise ValueError(f"zeros {tuple(zeros.shape)} must match scales {tuple(scales.shape)}")

    def args(self):
        packed = self.packed.contiguous()
        if self.bits == 16:
            return packed, packed, packed, packed.stride(0), 1
        scales = self.scales.contiguous()
        zeros = scales if self.zeros is None else self.zeros.contiguous()
        return packed, scales, zeros, packed.stride(0), self.cols // self.group

    def constexprs(self) -> tuple[int, int, bool]:
        return self.bits, (self.group if self.bits != 16 else 1), self.zeros is None

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        """The float matrix (reference)."""
        if self.bits == 16:
            return self.packed.to(dtype)
        return dequantize_packed(self.packed, self.scales, self.zeros, self.bits, self.group, dtype)


def configs() -> list[dict]:
    """Configs ``sparsefx autotune`` tries."""
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w}
            for bm in (1, 16, 64) for bn in (32, 64, 128) for bk in (32, 64, 128) for sk in (1, 4)
            for w in (4, 8) if bm * bn * bk <= 65536 and (bm > 1 or sk > 1 or bn >= 64)]


def default_config(m: int, k: int, n: int) -> dict:
    """Heuristic when the autotune cache has no entry: broadcast-and-sum for a few rows, ``tl.dot`` beyond."""
    if m <= 4:
        block_n = 64
        split = max(1, min(8, 256 // max(1, -(-n // block_n)), k // 512))
        return {"BLOCK_M": 1 if m == 1 else 4, "BLOCK_N": block_n, "BLOCK_K": 64, "SPLIT_K": split, "num_warps": 4}
    return {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4}


def gemv_configs() -> list[dict]:
    """Configs ``sparsefx autotune`` tries for ``quant_gemv``: weight rows per program, K block, K splits."""
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4 if bn <= 16 else 8}
            for bn in (8, 16, 32, 64) for bk in (128, 256, 512) for sk in (1, 2, 4, 8, 16) if bn * bk <= 16384]


def default_gemv_config(k: int, n: int) -> dict:
    """Heuristic for ``quant_gemv`` without an autotune entry: 16 rows x 512 codes per step (8 x 256 for a rank-64
    projection; what H100 tuning picked) and the K loop split until there are about ``TARGET_PROGRAMS`` programs."""
    block_n, block_k = (16, 512) if n >= 1024 else (8, 256)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": splits_for(-(-n // block_n), k, block_k),
            "num_warps": 4}


def gemv_eligible(m: int, main: Packed | None) -> bool:
    """Whether ``quant_gemv`` can run: one row, 2/3/4/8-bit codes in power-of-two groups of at least 32."""
    return (m == 1 and main is not None and main.bits in (2, 3, 4, 8) and main.group >= 32
            and main.group & (main.group - 1) == 0)


def _lowrank_args(lowrank, m: int, dummy):
    if lowrank is None:
        return dummy, 0, 0, (dummy, dummy, dummy, 0, 1), (16, 1, True)
    t = lowrank[0].contiguous()
    return t, t.shape[1], t.stride(0), lowrank[1].args(), lowrank[1].constexprs()


def _check(x, main, lowrank) -> tuple[int, int, int]:
    check_device(x)
    if x.dim() != 2:
        raise ValueError(f"quant_matmul: x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    if main is None and lowrank is None:
        raise ValueError("quant_matmul: nothing to multiply (no main weight and no low-rank part)")
    if main is not None and main.cols != k:
        raise ValueError(f"quant_matmul: x has {k} columns but the weight {main.cols}")
    n = main.rows if main is not None else lowrank[1].cols
    if lowrank is not None and (lowrank[1].cols != n or lowrank[0].shape != (m, lowrank[1].rows)):
        raise ValueError(f"quant_matmul: low-rank part t {tuple(lowrank[0].shape)} x A^T "
                         f"[{lowrank[1].rows}, {lowrank[1].cols}] does not fit [{m}, {n}]")
    return m, k, n


def quant_gemv(x: torch.Tensor, main: Packed, bias: torch.Tensor | None = None,
               colscale: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, Packed] | None = None,
               config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``quant_matmul`` for one token (``x: [1, K]``) with 2/3/4/8-bit codes in power-of-two groups (see
    ``gemv_eligible``), through the GEMV kernel -> fp32 ``[1, N]``.

    Example:
        >>> quant_gemv(x[:1], Packed(qw.packed, qw.scales, qw.zeros, 4, 128))  # doctest: +SKIP
    """
    m, k, n = _check(x, main, lowrank)
    if not gemv_eligible(m, main):
        raise ValueError(f"quant_gemv takes one row of 2/3/4/8-bit codes in power-of-two groups >= 32; got {m} "
                         f"rows of {None if main is None else main.bits}-bit codes in groups of "
                         f"{None if main is None else main.group} (use quant_matmul)")

    cfg = config or lookup("quant_gemv", x.device, (k, n, main.bits)) or default_gemv_config(k, n)
    k_chunk, split = k_chunks(k, cfg["BLOCK_K"], cfg["SPLIT_K"])
    y = output_buffer(out, (1, n), x.device, zero=split > 1)
    dummy = y
    t, r, _, a_args, (a_bits, a_group, a_sym) = _lowrank_args(lowrank, m, dummy)
    packed, scales, zeros, p_stride, n_groups = main.args()
    grid = (-(-n // cfg["BLOCK_N"]), split)
    _kernel("qgemv")[grid](
        x.contiguous(), y, n, k, packed, scales, zeros, p_stride, n_groups, t, r, *a_args,
        dummy if colscale is None else colscale.contiguous(), dummy if bias is None else bias.contiguous(), k_chunk,
        BITS=main.bits, GROUP=main.group, SYM=main.zeros is None, A_BITS=a_bits, A_GROUP=a_group, A_SYM=a_sym,
        HAS_LR=lowrank is not None, HAS_COLSCALE=colscale is not None, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y


def quant_matmul(x: torch.Tensor, main: Packed | None, bias: torch.Tensor | None = None,
                 colscale: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, Packed] | None = None,
                 config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [M, K]`` times the dequantized transpose of ``main`` (``[N, K]``), times ``colscale`` per column, plus
    ``t @ deq(at)`` for ``lowrank = (t [M, R], at [R, N])``, plus ``bias`` -> fp32 ``[M, N]`` (written into
    ``out`` when given).

    One token with 2/3/4/8-bit codes in power-of-two groups goes to ``quant_gemv`` unless a ``config`` of this
    kernel is given.

    Example:
        >>> quant_matmul(x, Packed(qw.packed, qw.scales, qw.zeros, 4, 64))  # doctest: +SKIP
    """
    m, k, n = _check(x, main, lowrank)
    if config is None and gemv_eligible(m, main):
        return quant_gemv(x, main, bias, colscale, lowrank, out=out)

    cfg = config or lookup("quant_matmul", x.device, (m, k, n, main.bits if main else 0)) or default_config(m, k, n)
    k_chunk, split = k_chunks(k, cfg["BLOCK_K"], cfg["SPLIT_K"] if main is not None else 1)
    y = output_buffer(out, (m, n), x.device, zero=split > 1)
    x = x.contiguous()
    dummy = y                                  # stands in for absent pointers (never read: constexpr-guarded)
    p_args = main.args() if main is not None else (dummy, dummy, dummy, 0, 1)
    bits, group, sym = main.constexprs() if main is not None else (16, 1, True)
    t, r, st_m, a_args, (a_bits, a_group, a_sym) = _lowrank_args(lowrank, m, dummy)
    use_dot = cfg["BLOCK_M"] >= 16
    grid = (-(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"]), split)
    _kernel("qmm")[grid](x, y, m, n, k, x.stride(0), *p_args, t, r, st_m, *a_args,
              dummy if colscale is None else colscale.contiguous(), dummy if bias is None else bias.contiguous(),
              k_chunk, BITS=bits, GROUP=group, SYM=sym, HAS_MAIN=main is not None, A_BITS=a_bits, A_GROUP=a_group,
              A_SYM=a_sym, HAS_LR=lowrank is not None, HAS_COLSCALE=colscale is not None, HAS_BIAS=bias is not None,
              ATOMIC=split > 1, USE_DOT=use_dot, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y


def quant_matmul_reference(x, main: Packed | None, bias=None, colscale=None, lowrank=None) -> torch.Tensor:
    """What ``quant_matmul`` computes, in plain torch (fp32)."""
    x = x.float()
    y = 0.0
    if main is not None:
        y = x @ main.dense().T
        if colscale is not None:
            y = y * colscale.float()
    if lowrank is not None:
        y = y + lowrank[0].float() @ lowrank[1].dense()
    return y if bias is None else y + bias.float()


@torch.library.custom_op("sparsefx::triton_quant_linear", mutates_args=())
def triton_quant_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``sparsefx::quant_linear`` through the Triton kernel (same signature)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = quant_matmul(x2, Packed(packed, scales, zeros, bits, group_size), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


@triton_quant_linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("sparsefx::triton_lowrank_quant_linear", mutates_args=())
def triton_lowrank_quant_linear(x: torch.Tensor, packed: torch.Tensor | None, scales: torch.Tensor | None,
                                zeros: torch.Tensor | None, at_packed: torch.Tensor, at_scales: torch.Tensor | None,
                                at_zeros: torch.Tensor | None, d: torch.Tensor, b_packed: torch.Tensor,
                                b_scales: torch.Tensor | None, b_zeros: torch.Tensor | None,
                                bias: torch.Tensor | None, bits: int, group_size: int, factor_bits: int,
                                factor_group: int) -> torch.Tensor:
    """``sparsefx::lowrank_quant_linear`` through the Triton kernel (same signature): two launches, the rank-r
    projection scaled by ``d``, then the main product with the low-rank epilogue and bias fused."""
    x2 = x.reshape(-1, x.shape[-1])
    b = Packed(b_packed, b_scales, b_zeros, factor_bits, factor_group)
    at = Packed(at_packed, at_scales, at_zeros, factor_bits, factor_group)
    t = quant_matmul(x2, b, colscale=d)                                       # [M, r]
    main = None if packed is None else Packed(packed, scales, zeros, bits, group_size)
    y = quant_matmul(x2, main, bias, lowrank=(t, at))
    return y.to(x.dtype).reshape(*x.shape[:-1], at.cols)


@triton_lowrank_quant_linear.register_fake
def _(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales, b_zeros, bias, bits,
      group_size, factor_bits, factor_group):
    out = at_packed.shape[1] * 8 // factor_bits if factor_bits != 16 else at_packed.shape[1]
    return x.new_empty((*x.shape[:-1], out))


__all__ = ["Packed", "configs", "default_config", "default_gemv_config", "gemv_configs", "gemv_eligible", "quant_gemv",
           "quant_matmul", "quant_matmul_reference", "triton_lowrank_quant_linear",
           "triton_quant_linear"]
