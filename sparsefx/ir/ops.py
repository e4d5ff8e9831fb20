"""Compressed ops of the IR, registered with torch.library: semantics, a fake (meta) implementation, and the
pure-torch reference that every kernel is checked against.

Each op here but ``threshold`` is *linear-like*: ``args[0]`` is the input ``x: [..., in]``, ``args[1]`` the
weight operand — the dense weight ``[out, in]``, or its packed form for ``quant_linear`` — and the output is
``[..., out]``. ``ir.linear_nodes`` finds them beside ``aten.linear`` so
annotation, verification and later passes treat them alike.

Importing this module registers the ops (it is imported by the passes that create them, never by ``sparsefx``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .annotate import register_linear_op


@torch.library.custom_op("sparsefx::tiered_linear", mutates_args=())
def tiered_linear(x: torch.Tensor, weight: torch.Tensor, weight_medium: torch.Tensor, bias: torch.Tensor | None,
                  t_high: float, t_low: float) -> torch.Tensor:
    """DAWS three-tier linear. Per element of ``x: [..., in]``:

    |x_i| >= t_high          -> high tier, multiplied by the full weights ``weight[:, i]``
    t_low <= |x_i| < t_high  -> medium tier, multiplied by the magnitude-pruned ``weight_medium[:, i]``
    |x_i| < t_low            -> dropped

    With ``t_high = t_low = 0`` every channel is high and the result is exactly ``F.linear(x, weight, bias)``.
    ``weight_medium`` may be stored in lower precision (e.g. fp16 beside fp32 weights); it is upcast to ``x``'s dtype
    for the math.

    Example:
        >>> w = torch.eye(3); x = torch.tensor([[3., 1., 0.1]])
        >>> torch.ops.sparsefx.tiered_linear(x, w, w * 0, None, 2.0, 0.5)
        tensor([[3., 0., 0.]])
    """
    return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)


def tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low):
    """The op's default implementation: two masked GEMMs (any device, any batch). Kernels registered per device
    (``codegen.cpu.enable_cpu_kernels``) fall back to it for the cases they do not handle."""
    return multitier_linear_math(x, weight, [weight_medium], bias, [t_high, t_low])


@tiered_linear.register_fake
def _(x, weight, weight_medium, bias, t_high, t_low):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "tiered_linear: x and weight disagree on in_features")
    torch._check(weight_medium.shape == weight.shape, lambda: "tiered_linear: weight_medium must match weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def tiered_linear_reference(x, weight, weight_medium, bias, t_high, t_low):
    """The op's semantics as plain torch (what kernels are checked against)."""
    a = x.abs()
    high = (a >= t_high).to(x.dtype)
    medium = ((a >= t_low) & (a < t_high)).to(x.dtype)
    y = (x * high) @ weight.T + (x * medium) @ weight_medium.to(x.dtype).T
    return y if bias is None else y + bias


@torch.library.custom_op("sparsefx::multitier_linear", mutates_args=())
def multitier_linear(x: torch.Tensor, weight: torch.Tensor, mediums: list[torch.Tensor], bias: torch.Tensor | None,
                     thresholds: list[float]) -> torch.Tensor:
    """DAWS with several medium tiers. ``thresholds`` descend, one more than ``mediums``; per element of x:

    |x_i| >= thresholds[0]                        -> the full weights ``weight[:, i]``
    thresholds[k+1] <= |x_i| < thresholds[k]      -> ``mediums[k][:, i]`` (pruned more the lower the tier)
    |x_i| < thresholds[-1]                        -> dropped

    With one medium this is ``tiered_linear(x, weight, mediums[0], bias, *thresholds)``; with all thresholds zero,
    ``F.linear(x, weight, bias)``. Mediums may be stored in lower precision; they are upcast for the math.

    Example:
        >>> w = torch.eye(3); x = torch.tensor([[3., 1., 0.1]])
        >>> torch.ops.sparsefx.multitier_linear(x, w, [w * 0.5], None, [2.0, 0.5])
        tensor([[3.0000, 0.5000, 0.0000]])
    """
    check_multitier_args(x, weight, mediums, thresholds)
    return multitier_linear_math(x, weight, mediums, bias, thresholds)


def tier_gemms(x, thresholds, weight_of, bias=None):
    """The default math of the tiered ops: one masked GEMM per non-empty tier, tier 0 taking ``|x| >= thresholds[0]``
    and tier k ``thresholds[k] <= |x| < thresholds[k - 1]``, each with its weight ``weight_of(k)`` (called only
    for tiers that hold some element's range)."""
    a = x.abs()
    upper = a >= thresholds[0]
    y = F.linear(torch.where(upper, x, 0.0), weight_of(0))
    for k in range(1, len(thresholds)):
        if thresholds[k] < thresholds[k - 1]:
            here = a >= thresholds[k]
            y = y + F.linear(torch.where(here & ~upper, x, 0.0), weight_of(k))
            upper = here
    return y if bias is None else y + bias


def tier_reference(x, thresholds, weight_of, bias=None):
    """The tiered ops' semantics as plain torch (what kernels are checked against): the tier of each element by
    counting the thresholds it reaches, then one product per tier with its weight ``weight_of(k)``."""
    a = x.abs()
    n = len(thresholds)
    reached = sum((a >= t).long() for t in thresholds)        # n: tier 0 (full weights) ... 0: dropped
    y = sum((x * (reached == n - k)) @ weight_of(k).T for k in range(n))
    return y if bias is None else y + bias


def multitier_linear_math(x, weight, mediums, bias, thresholds):
    """The op's default implementation: one masked GEMM per non-empty tier (any device, any batch)."""
    return tier_gemms(x, thresholds, lambda k: weight if k == 0 else mediums[k - 1].to(x.dtype), bias)


def check_multitier_args(x, weight, mediums, thresholds):
    """Raise (``torch._check``) unless the operands of ``multitier_linear`` fit together; every kernel calls it."""
    torch._check(x.shape[-1] == weight.shape[1], lambda: "multitier_linear: x and weight disagree on in_features")
    torch._check(len(thresholds) == len(mediums) + 1,
                 lambda: f"multitier_linear: {len(mediums)} mediums need {len(mediums) + 1} thresholds, "
                         f"got {len(thresholds)}")
    for wm in mediums:
        torch._check(wm.shape == weight.shape, lambda: "multitier_linear: every medium must match weight's shape")


@multitier_linear.register_fake
def _(x, weight, mediums, bias, thresholds):
    check_multitier_args(x, weight, mediums, thresholds)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def multitier_linear_reference(x, weight, mediums, bias, thresholds):
    """The op's semantics as plain torch (``tier_reference``)."""
    return tier_reference(x, thresholds, lambda k: weight if k == 0 else mediums[k - 1].to(x.dtype), bias)


@torch.library.custom_op("sparsefx::banded_linear", mutates_args=())
def banded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  thresholds: list[float]) -> torch.Tensor:
    """DAWS with nested medium tiers in one banded fp16 matrix (``ir/bandformat.py``). ``thresholds`` descend, 2 to 4
    of them; per element of x:

    |x_i| >= thresholds[0]                        -> all of ``weight[:, i]``
    thresholds[k] <= |x_i| < thresholds[k-1]      -> the weights of ``weight[:, i]`` whose band is >= k
    |x_i| < thresholds[-1]                        -> dropped

    ``weight``'s values (band bits included) are upcast to x's dtype for the math. With all thresholds zero this is
    ``F.linear(x, weight.to(x.dtype), bias)``.

    Example:
        >>> from sparsefx.ir.bandformat import pack_bands
        >>> w = pack_bands(torch.tensor([[1.0, 4.0], [4.0, 1.0]]), [2.0]); x = torch.tensor([[3., 1.]])
        >>> torch.ops.sparsefx.banded_linear(x, w, None, [2.0, 0.5])   # x_1 is medium: drops its weight 1.0
        tensor([[ 7.0039, 12.0117]])
    """
    check_banded_args(x, weight, thresholds)
    return banded_linear_math(x, weight, bias, thresholds)


def banded_linear_math(x, weight, bias, thresholds):
    """The op's default implementation: one masked GEMM per non-empty tier (any device, any batch)."""
    from .bandformat import tier_weight

    return tier_gemms(x, thresholds, lambda k: tier_weight(weight, k, x.dtype), bias)


def check_banded_args(x, weight, thresholds):
    """Raise unless the operands of ``banded_linear`` fit together; every kernel calls it."""
    from .bandformat import MAX_MEDIUMS

    torch._check(x.shape[-1] == weight.shape[1], lambda: "banded_linear: x and weight disagree on in_features")
    torch._check(weight.dtype == torch.float16,
                 lambda: f"banded_linear: the banded weight is fp16 (bands in its low bits), got {weight.dtype}")
    torch._check(2 <= len(thresholds) <= MAX_MEDIUMS + 1,
                 lambda: f"banded_linear: expected 2 to {MAX_MEDIUMS + 1} thresholds (1 to {MAX_MEDIUMS} medium "
                         f"tiers), got {len(thresholds)}")


@banded_linear.register_fake
def _(x, weight, bias, thresholds):
    check_banded_args(x, weight, thresholds)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def banded_linear_reference(x, weight, bias, thresholds):
    """The op's semantics as plain torch (``tier_reference``), the weights of tier k by comparing bands."""
    from .bandformat import tier_weight

    return tier_reference(x, thresholds, lambda k: tier_weight(weight, k, x.dtype), bias)


@torch.library.custom_op("sparsefx::sparse_lowrank_linear", mutates_args=())
def sparse_lowrank_linear(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor | None, t: float) -> torch.Tensor:
    """R-Sparse linear: channels with ``|x_i| >= t`` use the full weights, the rest the rank-r factors ``u @ v``.

    x: [..., in], weight: [out, in], u: [out, r], v: [r, in]. With ``t = 0`` the result is ``F.linear(x, W, b)``.

    Example:
        >>> w = torch.eye(2); u, v = torch.ones(2, 1), torch.ones(1, 2)
        >>> torch.ops.sparsefx.sparse_lowrank_linear(torch.tensor([[3., 0.5]]), w, u, v, None, 1.0)
        tensor([[3.5000, 0.5000]])
    """
    keep = x.abs() >= t
    y = F.linear(torch.where(keep, x, 0.0), weight)
    if t > 0:
        y = y + F.linear(F.linear(torch.where(keep, 0.0, x), v), u)
    return y if bias is None else y + bias


@sparse_lowrank_linear.register_fake
def _(x, weight, u, v, bias, t):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_lowrank_linear: x and weight disagree on in_features")
    torch._check(u.shape[0] == weight.shape[0] and v.shape[1] == weight.shape[1] and u.shape[1] == v.shape[0],
                 lambda: "sparse_lowrank_linear: u must be [out, r] and v [r, in]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def sparse_lowrank_linear_reference(x, weight, u, v, bias, t):
    keep = (x.abs() >= t).to(x.dtype)
    y = (x * keep) @ weight.T + ((x * (1 - keep)) @ v.T) @ u.T
    return y if bias is None else y + bias


@torch.library.custom_op("sparsefx::threshold", mutates_args=())
def threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """Zero the elements with ``|x| < t`` (CATS's thresholded MLP activation); ``t = 0`` is the identity.

    Example:
        >>> torch.ops.sparsefx.threshold(torch.tensor([-2., 0.1, 1.]), 0.5)
        tensor([-2.,  0.,  1.])
    """
    return torch.where(x.abs() >= t, x, 0.0)


@threshold.register_fake
def _(x, t):
    return torch.empty_like(x)


@torch.library.custom_op("sparsefx::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Linear with a group-quantized weight in the packed format of ``ir/qformat.py``.

    x: [..., in], packed: uint8 [out, in * bits / 8], scales: fp16 [out, in / group_size], zeros: uint8 (same
    shape; None = symmetric). Reference implementation: dequantize, then ``F.linear`` in ``x``'s dtype.

    Example:
        >>> from sparsefx.ir.qformat import QuantSpec
        >>> from sparsefx.passes.quant import quantize_rtn
        >>> qw = quantize_rtn(torch.eye(32), QuantSpec(4, 32))
        >>> torch.ops.sparsefx.quant_linear(torch.ones(1, 32), qw.packed, qw.scales, qw.zeros, None, 4, 32).sum()
        tensor(32.)
    """
    return quant_linear_math(x, packed, scales, zeros, bias, bits, group_size)


def quant_linear_math(x, packed, scales, zeros, bias, bits, group_size):
    """The op's default implementation (dequantize, then one GEMM). CPU kernels registered on the op
    (``codegen.cpu.enable_cpu_kernels``) fall back to it for what they do not handle (prefill, non-fp32 inputs)."""
    from .qformat import dequantize_packed

    return F.linear(x, dequantize_packed(packed, scales, zeros, bits, group_size, x.dtype), bias)


@quant_linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size):
    torch._check(packed.shape[1] * 8 == x.shape[-1] * bits, lambda: "quant_linear: x and packed weight disagree")
    torch._check(scales.shape[1] * group_size == x.shape[-1], lambda: "quant_linear: scales do not fit the groups")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _stored(packed, scales, zeros, bits: int, group_size: int, dtype) -> torch.Tensor:
    """A matrix stored either as float (``bits == 16``: ``packed`` is the fp16 matrix itself) or in the packed
    format of ``ir/qformat.py``."""
    if bits == 16:
        return packed.to(dtype)
    from .qformat import dequantize_packed

    return dequantize_packed(packed, scales, zeros, bits, group_size, dtype)


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


@lowrank_quant_linear.register_fake
def lowrank_quant_linear_fake(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                              b_zeros, bias, bits, group_size, factor_bits, factor_group):
    """Output shape of ``lowrank_quant_linear`` (and of its C++ twin ``sparsefx_cpu::lowrank_quant_linear``)."""
    r = d.shape[0]
    torch._check(at_packed.shape[0] == r and b_packed.shape[0] == r, lambda: "lowrank_quant_linear: rank mismatch")
    out = at_packed.shape[1] * 8 // factor_bits if factor_bits != 16 else at_packed.shape[1]
    return x.new_empty((*x.shape[:-1], out))


@torch.library.custom_op("sparsefx::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None, n: int,
              m: int) -> torch.Tensor:
    """Linear with an N:M sparse weight stored as ``values`` + uint8 in-group ``index`` (``ir/nmformat.py``).

    Reference: up to 8 rows (decode) gather x at each kept weight's input and sum — the weights are read once, as
    values and indices; more rows unpack the dense weight and run one GEMM.

    Example:
        >>> from sparsefx.ir.nmformat import pack_nm
        >>> v, i = pack_nm(torch.tensor([[0., 2., 0., 3.]]), 2, 4)
        >>> torch.ops.sparsefx.nm_linear(torch.tensor([[1., 1., 1., 2.]]), v, i, None, 2, 4)
        tensor([[8.]])
    """
    return nm_linear_math(x, values, index, bias, n, m)


def nm_linear_math(x, values, index, bias, n, m):
    from .nmformat import input_columns, unpack_nm

    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= 8:
        y = (x2[:, input_columns(index, n, m)] * values.to(x.dtype)).sum(-1)          # [M, out, kept] -> [M, out]
        y = y.reshape(*x.shape[:-1], values.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, unpack_nm(values, index, n, m).to(x.dtype), bias)


@nm_linear.register_fake
def _(x, values, index, bias, n, m):
    torch._check(values.shape == index.shape, lambda: "nm_linear: values and index shapes differ")
    torch._check(values.shape[1] * m == x.shape[-1] * n, lambda: "nm_linear: x and the N:M weight disagree")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


LINEAR_LIKE_OPS = (torch.ops.sparsefx.tiered_linear.default, torch.ops.sparsefx.multitier_linear.default,
                   torch.ops.sparsefx.banded_linear.default,
                   torch.ops.sparsefx.sparse_lowrank_linear.default,
                   torch.ops.sparsefx.quant_linear.default, torch.ops.sparsefx.lowrank_quant_linear.default,
                   torch.ops.sparsefx.nm_linear.default)
for _op in LINEAR_LIKE_OPS:
    register_linear_op(_op)
