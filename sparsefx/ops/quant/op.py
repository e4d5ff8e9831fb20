"""The quantized ops: ``quant_linear`` (a group-quantized weight, ``format.py``) and ``lowrank_quant_linear``
(``W ≈ Q + A diag(d) B``: DAM and the Q→L / L→Q combinations) — schemas, fakes, default math and references.

Both are *linear-like* (``args[0]`` the input, ``args[1]`` the packed weight operand).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ...ir.annotate import register_linear_op

from .format import dequantize_packed


@torch.library.custom_op("sparsefx::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Linear with a group-quantized weight in the packed format of ``format.py``.

    x: [..., in], packed: uint8 [out, in * bits / 8], scales: fp16 [out, in / group_size], zeros: uint8 (same
    shape; None = symmetric). Reference implementation: dequantize, then ``F.linear`` in ``x``'s dtype.

    Example:
        >>> from sparsefx.ops.quant.format import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> qw = quantize_rtn(torch.eye(32), QuantSpec(4, 32))
        >>> torch.ops.sparsefx.quant_linear(torch.ones(1, 32), qw.packed, qw.scales, qw.zeros, None, 4, 32).sum()
        tensor(32.)
    """
    return quant_linear_math(x, packed, scales, zeros, bias, bits, group_size)


def quant_linear_math(x, packed, scales, zeros, bias, bits, group_size):
    """The op's default implementation (dequantize, then one GEMM). CPU kernels registered on the op
    (``codegen.cpu.enable_cpu_kernels``) fall back to it for what they do not handle (prefill, non-fp32 inputs)."""
    return F.linear(x, dequantize_packed(packed, scales, zeros, bits, group_size, x.dtype), bias)


@quant_linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size):
    torch._check(packed.shape[1] * 8 == x.shape[-1] * bits, lambda: "quant_linear: x and packed weight disagree")
    torch._check(scales.shape[1] * group_size == x.shape[-1], lambda: "quant_linear: scales do not fit the groups")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _stored(packed, scales, zeros, bits: int, group_size: int, dtype) -> torch.Tensor:
    """A matrix stored either as float (``bits == 16``: ``packed`` is the fp16 matrix itself) or in the packed
    format of ``format.py``."""
    if bits == 16:
        return packed.to(dtype)
    return dequantize_packed(packed, scales, zeros, bits, group_size, dtype)


def quant_linear_reference(x, packed, scales, zeros, bias, bits, group_size):
    """The op's semantics as plain torch (what kernels are checked against): ``x @ deq(W)ᵀ (+ bias)``."""
    y = x @ dequantize_packed(packed, scales, zeros, bits, group_size, x.dtype).T
    return y if bias is None else y + bias


@torch.library.custom_op("sparsefx::lowrank_quant_linear", mutates_args=())
def lowrank_quant_linear(x: torch.Tensor, packed: torch.Tensor | None, scales: torch.Tensor | None,
                         zeros: torch.Tensor | None, at_packed: torch.Tensor, at_scales: torch.Tensor | None,
                         at_zeros: torch.Tensor | None, d: torch.Tensor, b_packed: torch.Tensor,
                         b_scales: torch.Tensor | None, b_zeros: torch.Tensor | None, bias: torch.Tensor | None,
                         bits: int, group_size: int, factor_bits: int, factor_group: int) -> torch.Tensor:
    """``W ≈ Q + A diag(d) B`` in one linear (DAM and the Q→L / L→Q combinations):

    y = x @ deq(Q)^T + ((x @ B^T) * d) @ A^T  (+ bias)

    Q: the main weight in the packed format (``packed``/``scales``/``zeros``, ``bits``, ``group_size``; ``packed``
    None = no main weight, a pure low-rank layer). ``A^T: [r, out]`` and ``B: [r, in]`` are stored either as fp16
    (``factor_bits == 16``; their scales/zeros None) or packed with ``factor_bits``/``factor_group`` (groups along
    ``out`` for ``A^T``, along ``in`` for ``B``). ``d: [r]`` is the diagonal between them.
    """
    return lowrank_quant_linear_math(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                                     b_zeros, bias, bits, group_size, factor_bits, factor_group)


def lowrank_quant_linear_math(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales, b_zeros,
                              bias, bits, group_size, factor_bits, factor_group):
    """The op's default implementation: the factors dequantized, three GEMMs (the main one through
    ``sparsefx::quant_linear``, so its registered kernels apply)."""
    y = F.linear(x, _stored(b_packed, b_scales, b_zeros, factor_bits, factor_group, x.dtype))      # [..., r]
    y = F.linear(y * d.to(x.dtype), _stored(at_packed, at_scales, at_zeros, factor_bits, factor_group,
                                            x.dtype).T)                                           # [..., out]
    if packed is not None:
        y = y + quant_linear(x, packed, scales, zeros, None, bits, group_size)
    return y if bias is None else y + bias


def lowrank_quant_linear_reference(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                                   b_zeros, bias, bits, group_size, factor_bits, factor_group):
    """The op's semantics as plain torch: ``x @ deq(Q)ᵀ + ((x @ deq(B)ᵀ) * d) @ deq(Aᵀ) (+ bias)``."""
    u = (x @ _stored(b_packed, b_scales, b_zeros, factor_bits, factor_group, x.dtype).T) * d.to(x.dtype)
    y = u @ _stored(at_packed, at_scales, at_zeros, factor_bits, factor_group, x.dtype)
    if packed is not None:
        y = y + x @ dequantize_packed(packed, scales, zeros, bits, group_size, x.dtype).T
    return y if bias is None else y + bias


@lowrank_quant_linear.register_fake
def lowrank_quant_linear_fake(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                              b_zeros, bias, bits, group_size, factor_bits, factor_group):
    """Output shape of ``lowrank_quant_linear`` (and of its C++ twin ``sparsefx_cpu::lowrank_quant_linear``)."""
    r = d.shape[0]
    torch._check(at_packed.shape[0] == r and b_packed.shape[0] == r, lambda: "lowrank_quant_linear: rank mismatch")
    out = at_packed.shape[1] * 8 // factor_bits if factor_bits != 16 else at_packed.shape[1]
    return x.new_empty((*x.shape[:-1], out))


for _name in ("quant_linear", "lowrank_quant_linear"):   # linear-like: found by ir.linear_nodes
    register_linear_op(getattr(torch.ops.sparsefx, _name).default)
