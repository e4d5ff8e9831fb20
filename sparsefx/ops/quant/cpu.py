"""Decode-time matmul over group-quantized weights on CPU, reading the packed codes directly.

A batch-1 linear reads its whole weight once per token, so its cost is the weight's bytes: the packed format of
``ops/quant/format.py`` (``bits`` per weight plus a scale, and a zero, per group) is 7-10x smaller than fp32. The
reference ``sparsefx::quant_linear`` dequantizes the whole matrix to fp32 first and then multiplies — more bytes
moved than the dense model. This kernel never materialises the float weight:

    y[m, o] = sum_g scale[o, g] * (sum_{j in g} q[o, j] * x[m, j]  -  zero[o, g] * sum_{j in g} x[m, j])

Thirty-two codes at a time are widened to fp32 lanes and multiplied into x with FMA: 4- and 2-bit codes are split
into bit planes of whole bytes (a mask and a shift per plane, then a byte-to-int32 zero-extension), so the lanes
hold the codes interleaved and x is permuted to the same order once per call; 8-bit codes zero-extend directly;
3-bit codes (eight per three bytes) are broadcast per 32-bit word and shifted per lane. Per group, the dot product
is scaled in vector lanes; the zero point's term uses per-group sums of x computed once per call. Rows of the
output are split between threads. For DAM's low-rank part, ``quant_gemv_t`` accumulates ``u @ deq(Aᵀ)`` where
``Aᵀ: [r, out]`` is packed with its groups along ``out``.

``quant_matmul_q8`` (opt-in: ``prepare_cpu_decode(int8_activations=True)``, the backend's ``int8_activations``
option) rounds each run of 32 inputs of x to int8 with its own scale, as llama.cpp's Q8_0 does, and multiplies codes
as bytes: one vpmaddubsw (unsigned code times signed x, pairs summed to int16) and one vpmaddwd take 32 codes, where
the fp32 kernel widens them to four fp32 vectors. 4-, 2- and 8-bit codes (the last split into nibbles) come out of
the same bit planes as above; 3-bit codes are spread to bytes with one shuffle, one variable shift and four masks.
DAM's op has the same option (``lowrank_quant_matmul_q8``, ``sparsefx_cpu::lowrank_quant_linear_q8``): x is rounded
for both products that read it (``x Bᵀ`` and the main rows), ``u = (x Bᵀ) d`` stays fp32.

Both take up to ``MAX_ROWS`` rows of fp32 ``x`` (decode, small batches); prefill GEMMs are compute-bound and stay on
dequantize + MKL (``op.quant_linear_math``). ``quant_matmul_reference`` / ``quant_gemv_t_reference`` are the
pure-torch references. ``sparsefx_cpu::quant_linear`` (``cpp_quant_linear``) and ``sparsefx_cpu::lowrank_quant_linear``
(``cpp_lowrank_quant_linear``) are the ops with these kernels registered in C++ — decode from the packed codes,
prefill dequantized in C++ then GEMMs — for compiled graphs. DAM's decode runs in one parallel region: ``u = (x Bᵀ)
d`` first (rank-wide), then each thread takes a run of ``Aᵀ``'s output groups and writes their main rows and adds
their low-rank columns.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch.nn import functional as F

from ..build import cpu_supports_kernels, try_load_extension
from .format import dequantize_packed
from .op import (lowrank_quant_linear_fake, lowrank_quant_linear_math, lowrank_quant_linear_reference,
                 quant_linear_math, quant_linear_reference)

log = logging.getLogger(__name__)

MAX_ROWS = 8        # rows of x the kernels take; more rows are a GEMM (dequantize once, then MKL)

def quant_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           bits: int, group_size: int) -> torch.Tensor:
    """``x: [M, in] @ deq(W)ᵀ`` with ``W`` packed ``[out, in * bits / 8]`` (``ops/quant/format.py``) -> ``[M, out]``.

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> qw = quantize_rtn(torch.eye(32), QuantSpec(4, 32))
        >>> quant_matmul_reference(torch.ones(1, 32), qw.packed, qw.scales, qw.zeros, 4, 32).sum().round()
        tensor(32.)
    """
    return quant_linear_reference(x, packed, scales, zeros, None, bits, group_size)


def quant_gemv_t_reference(u: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           bits: int, group_size: int) -> torch.Tensor:
    """``u: [M, r] @ deq(Aᵀ)`` with ``Aᵀ`` packed ``[r, out * bits / 8]`` (groups along ``out``) -> ``[M, out]``."""
    return u @ dequantize_packed(packed, scales, zeros, bits, group_size, u.dtype)


SOURCE = Path(__file__).with_name("quant.cpp")


@functools.cache
def extension():
    """Build (once per environment; cached by the source's content) and return the C++ extension of ``quant.cpp``,
    or None if it cannot be built here (its ``sparsefx_cpu::*`` ops are registered when it loads)."""
    ext = try_load_extension("quant", SOURCE, "the C++ quantized decode kernels",
                             defines={"SPARSEFX_MAX_ROWS": MAX_ROWS})
    if ext is None:
        return None

    def quant_linear_fake(x, packed, scales, zeros, bias, bits, group_size):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    torch.library.register_fake("sparsefx_cpu::quant_linear")(quant_linear_fake)
    torch.library.register_fake("sparsefx_cpu::quant_linear_q8")(quant_linear_fake)
    # same shapes as the op it stands in for
    torch.library.register_fake("sparsefx_cpu::lowrank_quant_linear")(lowrank_quant_linear_fake)
    torch.library.register_fake("sparsefx_cpu::lowrank_quant_linear_q8")(lowrank_quant_linear_fake)
    return ext


def cpp_quant_linear(int8_activations: bool = False):
    """The C++-registered op ``sparsefx_cpu::quant_linear`` (same signature as ``sparsefx::quant_linear``), or None
    where the extension cannot run (no AVX2/FMA/F16C, no compiler). With ``int8_activations``,
    ``sparsefx_cpu::quant_linear_q8``: decode rows of x rounded to int8 per 32 inputs (``quant_matmul_q8``)."""
    if not cpu_supports_kernels() or extension() is None:
        return None
    return (torch.ops.sparsefx_cpu.quant_linear_q8 if int8_activations else torch.ops.sparsefx_cpu.quant_linear).default


def cpp_lowrank_quant_linear(int8_activations: bool = False):
    """The C++-registered op ``sparsefx_cpu::lowrank_quant_linear`` (same signature as
    ``sparsefx::lowrank_quant_linear``): decode from the packed codes with the whole linear in one parallel region,
    fp16 factors and prefill through GEMMs. None where the extension cannot run. With ``int8_activations``,
    ``sparsefx_cpu::lowrank_quant_linear_q8``: decode rows of x rounded to int8 per 32 inputs for the products that
    read x (``lowrank_quant_matmul_q8``)."""
    if not cpu_supports_kernels() or extension() is None:
        return None
    ops = torch.ops.sparsefx_cpu
    return (ops.lowrank_quant_linear_q8 if int8_activations else ops.lowrank_quant_linear).default


def takes_input(x: torch.Tensor) -> bool:
    """Whether the C++ kernels take ``x``: fp32 on the CPU, at most ``MAX_ROWS`` rows, a CPU with AVX2/FMA/F16C and
    the extension compiled."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.dtype == torch.float32 and x.device.type == "cpu" and 0 < rows <= MAX_ROWS and cpu_supports_kernels()
            and extension() is not None)


def kernel_available(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor | None,
                     zeros: torch.Tensor | None, bits: int) -> bool:
    """Whether the C++ kernels take these operands: ``x`` as ``takes_input``, and a packed (not fp16) CPU matrix of
    2/3/4/8-bit codes with fp16 scales and uint8 zeros (or none)."""
    return (bits in (2, 3, 4, 8) and packed.dtype == torch.uint8 and scales is not None
            and scales.dtype == torch.float16 and (zeros is None or zeros.dtype == torch.uint8)
            and all(t.device.type == "cpu" for t in (packed, scales, zeros) if t is not None) and takes_input(x))


_NO_ZEROS = torch.empty(0, dtype=torch.uint8)
_NO_SCALES = torch.empty(0, dtype=torch.float16)


def _zeros_arg(zeros: torch.Tensor | None) -> torch.Tensor:
    """Zero points as the kernels take them: contiguous uint8, or an empty tensor for symmetric groups."""
    return _NO_ZEROS if zeros is None else zeros.contiguous()


def quant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int) -> torch.Tensor:
    """``x: [..., in] @ deq(W)ᵀ -> [..., out]`` reading the packed codes (C++ kernel where ``kernel_available``,
    the reference otherwise).

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> qw = quantize_rtn(torch.randn(1536, 576), QuantSpec(4, 64))
        >>> quant_matmul(torch.randn(1, 576), qw.packed, qw.scales, qw.zeros, 4, 64).shape
        torch.Size([1, 1536])
    """
    x2 = x.reshape(-1, x.shape[-1])
    if not kernel_available(x2, packed, scales, zeros, bits):
        y = quant_matmul_reference(x2, packed, scales, zeros, bits, group_size)
    else:
        y = _run_packed("quant_matmul", x2, packed, scales, zeros, bits, group_size)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def _run_packed(kernel: str, x2, packed, scales, zeros, bits, group_size) -> torch.Tensor:
    """The extension's ``kernel`` (``quant_matmul`` or ``quant_matmul_q8``) on ``x2: [M, in]``, operands made
    contiguous as the kernel takes them."""
    return getattr(extension(), kernel)(x2.contiguous(), packed.contiguous(), scales.contiguous(), _zeros_arg(zeros),
                                         bits, group_size)


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., in]`` (``in`` a multiple of 32) as ``quant_matmul_q8`` sees it: each run of 32 inputs rounded to
    int8 steps of ``max |x| / 127`` (llama.cpp's Q8_0), returned as fp32 values.

    Example:
        >>> round_activations_int8(torch.linspace(-1, 1, 32))[:2]
        tensor([-1.0000, -0.9370])
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(blocks * (127 / amax.clamp_min(torch.finfo(torch.float32).tiny))), 0.0)
    return (q * (amax / 127)).reshape(x.shape)


def quant_matmul_q8_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                              zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``quant_matmul_q8``'s result in float64: ``x`` rounded by ``round_activations_int8``, then the reference."""
    return quant_matmul_reference(round_activations_int8(x).double(), packed, scales, zeros, bits, group_size)


def quant_matmul_q8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int) -> torch.Tensor:
    """``quant_matmul`` with ``x`` rounded to int8 per 32 inputs (``round_activations_int8``) and the codes multiplied
    as bytes (vpmaddubsw): 1.1-2.5x faster than the fp32 kernel in ``bench/kernel_quant_gemv.py``, at the cost of
    that rounding. Up to ``MAX_ROWS`` fp32 rows on a CPU with AVX2 (``kernel_available``); raises otherwise.

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> w, x = quantize_rtn(torch.randn(96, 64), QuantSpec(3, 32)), torch.randn(2, 64)
        >>> q8 = quant_matmul_q8(x, w.packed, w.scales, w.zeros, 3, 32)
        >>> bool((q8 - quant_matmul(x, w.packed, w.scales, w.zeros, 3, 32)).abs().max() < 0.5)
        True
    """
    x2 = x.reshape(-1, x.shape[-1])
    if not kernel_available(x2, packed, scales, zeros, bits):
        raise ValueError("quant_matmul_q8 takes up to MAX_ROWS fp32 CPU rows and packed 2/3/4/8-bit codes with fp16 "
                         "scales on a CPU with AVX2/FMA/F16C; use quant_matmul elsewhere")
    y = _run_packed("quant_matmul_q8", x2, packed, scales, zeros, bits, group_size)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def quant_gemv_t(u: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``u: [M, r] @ deq(Aᵀ)`` for ``Aᵀ`` packed ``[r, out * bits / 8]`` with groups along ``out``, added into
    ``out`` (``[M, out]`` fp32, modified in place) when given.

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> at = quantize_rtn(torch.randn(8, 1536), QuantSpec(4, 64))  # rank 8, out 1536
        >>> quant_gemv_t(torch.randn(1, 8), at.packed, at.scales, at.zeros, 4, 64).shape
        torch.Size([1, 1536])
    """
    n_out = packed.shape[1] * 8 // bits
    if not kernel_available(u, packed, scales, zeros, bits):
        y = quant_gemv_t_reference(u, packed, scales, zeros, bits, group_size)
        return y if out is None else out.add_(y)
    if out is None:
        out = u.new_zeros(u.shape[0], n_out)
    extension().quant_gemv_t(u.contiguous(), packed.contiguous(), scales.contiguous(),
                              _zeros_arg(zeros), bits, group_size, out)
    return out


def lowrank_quant_matmul_reference(x, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d,
                                   b_packed, b_scales, b_zeros, factor_bits, factor_group) -> torch.Tensor:
    """``x @ deq(Q)ᵀ + ((x @ deq(B)ᵀ) * d) @ deq(Aᵀ)`` (``packed`` None: no main weight), all factors packed."""
    return lowrank_quant_linear_reference(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed,
                                          b_scales, b_zeros, None, bits, group_size, factor_bits, factor_group)


def lowrank_quant_matmul_q8_reference(x, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d,
                                      b_packed, b_scales, b_zeros, factor_bits, factor_group) -> torch.Tensor:
    """``lowrank_quant_matmul_q8``'s result in float64: ``x`` rounded by ``round_activations_int8`` for both products
    that read it, then ``lowrank_quant_matmul_reference``."""
    return lowrank_quant_matmul_reference(round_activations_int8(x).double(), packed, scales, zeros, bits,
                                          group_size, at_packed, at_scales, at_zeros, d, b_packed, b_scales, b_zeros,
                                          factor_bits, factor_group)


def lowrank_quant_matmul_q8(x, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d, b_packed,
                            b_scales, b_zeros, factor_bits, factor_group) -> torch.Tensor:
    """``lowrank_quant_matmul`` with ``x`` rounded to int8 per 32 inputs for ``x Bᵀ`` and the main rows (the
    int8-activation kernel of ``quant_matmul_q8``; ``u = (x Bᵀ) d`` stays fp32). Raises where the kernel does not
    apply (``kernel_available`` for every packed part)."""
    return lowrank_quant_matmul(x, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d,
                                b_packed, b_scales, b_zeros, factor_bits, factor_group, int8_activations=True)


def lowrank_quant_matmul(x, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d, b_packed,
                         b_scales, b_zeros, factor_bits, factor_group, int8_activations=False) -> torch.Tensor:
    """DAM's linear (without bias) in one kernel call for packed factors: ``x: [..., in] -> [..., out]`` (see
    ``lowrank_quant_matmul_reference``); the reference where the kernel does not apply.

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> q, at, b = (quantize_rtn(torch.randn(*s), QuantSpec(4, 64)) for s in ((192, 128), (8, 192), (8, 128)))
        >>> lowrank_quant_matmul(torch.randn(1, 128), q.packed, q.scales, q.zeros, 4, 64, at.packed, at.scales,
        ...                      at.zeros, torch.ones(8), b.packed, b.scales, b.zeros, 4, 64).shape
        torch.Size([1, 192])
    """
    x2 = x.reshape(-1, x.shape[-1])
    usable = (kernel_available(x2, at_packed, at_scales, at_zeros, factor_bits)
              and kernel_available(x2, b_packed, b_scales, b_zeros, factor_bits)
              and (packed is None or kernel_available(x2, packed, scales, zeros, bits)))
    if not usable and int8_activations:
        raise ValueError("lowrank_quant_matmul_q8 takes up to MAX_ROWS fp32 CPU rows and packed 2/3/4/8-bit parts "
                         "with fp16 scales on a CPU with AVX2/FMA/F16C; use lowrank_quant_matmul elsewhere")
    if not usable:
        y = lowrank_quant_matmul_reference(x2, packed, scales, zeros, bits, group_size, at_packed, at_scales,
                                           at_zeros, d, b_packed, b_scales, b_zeros, factor_bits, factor_group)
    else:
        # no main weight: empty tensors (the kernel then skips it)
        main = ((_NO_ZEROS, _NO_SCALES, _NO_ZEROS, 4) if packed is None
                else (packed.contiguous(), scales.contiguous(), _zeros_arg(zeros), bits))
        y = extension().lowrank_quant_matmul(
            x2.contiguous(), *main, group_size, at_packed.contiguous(), at_scales.contiguous(), _zeros_arg(at_zeros),
            d.float().contiguous(), b_packed.contiguous(), b_scales.contiguous(), _zeros_arg(b_zeros), factor_bits,
            factor_group, int8_activations)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------- the ops' CPU kernels and the decode preparation

def quant_linear_cpu(x, packed, scales, zeros, bias, bits, group_size):
    """``sparsefx::quant_linear``'s CPU kernel: decode and small batches read the packed codes; prefill dequantizes
    once and runs MKL's GEMM."""
    if not kernel_available(x, packed, scales, zeros, bits):
        return quant_linear_math(x, packed, scales, zeros, bias, bits, group_size)
    y = quant_matmul(x, packed, scales, zeros, bits, group_size)
    return y if bias is None else y + bias


def lowrank_quant_linear_cpu(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                             b_zeros, bias, bits, group_size, factor_bits, factor_group):
    """``sparsefx::lowrank_quant_linear``'s CPU kernel (up to ``MAX_ROWS`` rows: the whole linear in one call)."""
    x2 = x.reshape(-1, x.shape[-1])
    main_ok = packed is None or kernel_available(x2, packed, scales, zeros, bits)
    factors_ok = factor_bits == 16 or kernel_available(x2, b_packed, b_scales, b_zeros, factor_bits)
    if not (takes_input(x2) and main_ok and factors_ok):
        return lowrank_quant_linear_math(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed,
                                         b_scales, b_zeros, bias, bits, group_size, factor_bits, factor_group)
    if factor_bits == 16:   # fp16 factors: small (rank x width), converted per call
        u = F.linear(x2, b_packed.float()) * d.float()
        low = u @ at_packed.float()
        y = low if packed is None else quant_matmul(x2, packed, scales, zeros, bits, group_size).add_(low)
    else:                   # packed factors: the whole linear in one kernel call
        y = lowrank_quant_matmul(x2, packed, scales, zeros, bits, group_size, at_packed, at_scales, at_zeros, d,
                                 b_packed, b_scales, b_zeros, factor_bits, factor_group)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def prepare_quant(module, int8_activations: bool = False, **_) -> None:
    """A quantized module's packed storage is what the kernels read: nothing to re-store. It calls the C++-registered
    op directly (same signature; no Python between the call and the kernel), or the Python kernel without it."""
    module.decode_kernel = cpp_quant_linear(int8_activations) or quant_linear_cpu


def prepare_lowrank_quant(module, int8_activations: bool = False, **_) -> None:
    """As ``prepare_quant``, for ``LowRankQuantLinear`` (DAM)."""
    module.decode_kernel = cpp_lowrank_quant_linear(int8_activations) or lowrank_quant_linear_cpu
