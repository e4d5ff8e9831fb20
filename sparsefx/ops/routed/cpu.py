"""Batch-1 activation-sparse GEMV on CPU: ``y = W[:, keep] @ x[keep]`` reading only the kept weight rows.

Decode multiplies one token ``x: [in]`` by ``W: [out, in]``. When most |x_i| are small (activation sparsity), the
channels below a threshold can be dropped; the cost of a GEMV is reading W, so the kernel must read *only* the
weights of kept channels. Storing ``Wt = W.T`` (``[in, out]``, row-contiguous) makes each kept channel one
contiguous row, so the kernel streams ``n_kept * out`` floats:

    y[o] = sum_{i : |x_i| >= t_high} x_i * Wt[i, o]  +  sum_{i : t_low <= |x_i| < t_high} x_i * Wmt[i, o]

The C++ kernel (AVX2/FMA intrinsics, ``at::parallel_for``) splits the kept rows of both tiers between threads,
each accumulating a private y in cache (reduced at the end); very wide outputs split into column blocks instead.
The medium tier (DAWS) reads rows of ``Wmt = W_medium.T`` stored dense — its pruned weights are zeros in the row —
in fp32 or fp16 (``daws.medium_dtype: float16``: half the bytes per medium row, converted to fp32 with F16C; at the
default medium weight sparsity of 50 % that is the byte count of the kept weights). ``tiered_gemv_packed`` reads the
medium tier bitmask-packed instead (``pack_medium_rows``: each row's non-zeros plus one bit per weight), expanding eight
columns per mask byte with a lookup table and a permute; on this AVX2 CPU that expansion costs more than the bytes
it saves (``bench/kernel_daws_gemv.py``), so dense fp16 rows stay the default. ``multitier_gemv`` routes over several
medium tiers, each its own matrix; ``banded_gemv`` reads the banded layout (``format.py``: every tier in one
fp16 matrix, each weight's band in its low mantissa bits), all kept rows from one stream, zeroing the weights whose
band is below their row's tier. Short kept rows are prefetched by hand (see kSpanAhead in ``routed.cpp``).
``tiered_gemv_reference`` (and its siblings) are the pure-torch references and fallbacks.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ..build import cpu_supports_kernels, try_load_extension
from .format import MAX_MEDIUMS
from ..layout import transpose_weight, transposed_storage
from ..tuning import lookup
from .op import (banded_linear_math, banded_linear_reference, check_banded_args, check_multitier_args,
                 multitier_linear_math, multitier_linear_reference, tiered_linear_math,
                 tiered_linear_reference)

log = logging.getLogger(__name__)

def tiered_gemv_reference(x: torch.Tensor, wt: torch.Tensor, wmt: torch.Tensor | None, t_high: float,
                          t_low: float) -> torch.Tensor:
    """Pure-torch reference: ``x: [in]``, ``wt``/``wmt: [in, out]`` -> ``y: [out]`` (tiers as ``tiered_linear``).

    Example:
        >>> tiered_gemv_reference(torch.tensor([2., 0.6, 0.1]), torch.eye(3), torch.eye(3) * 0.5, 1.0, 0.5)
        tensor([2.0000, 0.3000, 0.0000])
    """
    if wmt is None or t_low >= t_high:          # no medium tier
        wmt, t_low = wt, t_high
    return tiered_linear_reference(x, wt.t(), wmt.t(), None, t_high, t_low)


@torch.no_grad()
def pack_medium_rows(wmt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bitmask-pack the rows of ``wmt: [in, out]`` (a pruned medium tier, transposed): ``(mask, values, offsets)``.

    ``mask: uint8 [in, ceil(out / 8)]`` has bit ``o % 8`` of byte ``o // 8`` set where ``wmt[i, o] != 0``;
    ``values`` (``wmt``'s dtype) holds each row's non-zeros in column order, row ``i`` at
    ``values[offsets[i]:offsets[i + 1]]``, followed by 8 zeros (the kernel loads 8 values at a time);
    ``offsets: int64 [in + 1]``. At medium weight sparsity ``s`` a row takes ``(1 - s) * itemsize + 1/8`` bytes per
    column instead of ``itemsize``.

    Example:
        >>> mask, values, offsets = pack_medium_rows(torch.tensor([[0., 2., 0., 3.]]))
        >>> mask.tolist(), values[:2].tolist(), offsets.tolist()
        ([[10]], [2.0, 3.0], [0, 2])
    """
    if wmt.dim() != 2:
        raise ValueError(f"pack_medium_rows expects wmt: [in, out], got shape {tuple(wmt.shape)}")
    n_in, out = wmt.shape
    nbytes = -(-out // 8)
    nz = torch.zeros(n_in, nbytes * 8, dtype=torch.bool, device=wmt.device)
    nz[:, :out] = wmt != 0
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=wmt.device)
    mask = (nz.view(n_in, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    values = torch.cat([wmt[nz[:, :out]], wmt.new_zeros(8)])
    offsets = torch.zeros(n_in + 1, dtype=torch.int64, device=wmt.device)
    offsets[1:] = nz.sum(1).cumsum(0)
    return mask.contiguous(), values.contiguous(), offsets


def unpack_medium(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out: int) -> torch.Tensor:
    """Inverse of ``pack_medium_rows``: the dense ``[in, out]`` rows."""
    bits = (mask[:, :, None].to(torch.int32) >> torch.arange(8, dtype=torch.int32, device=mask.device)) & 1
    nz = bits.reshape(mask.shape[0], -1)[:, :out].bool()
    dense = values.new_zeros(mask.shape[0], out)
    dense[nz] = values[: int(offsets[-1])]
    return dense


def tiered_gemv_packed_reference(x: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                                 offsets: torch.Tensor, t_high: float, t_low: float) -> torch.Tensor:
    """``tiered_gemv_reference`` with the medium tier given packed (``pack_medium_rows``)."""
    return tiered_gemv_reference(x, wt, unpack_medium(mask, values, offsets, wt.shape[1]), t_high, t_low)


def tiered_gemv_packed(x: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                       offsets: torch.Tensor, t_high: float, t_low: float) -> torch.Tensor:
    """``tiered_gemv`` reading the medium tier from its bitmask-packed rows (``pack_medium_rows``): fewer bytes per
    medium row when its weights are pruned. The C++ kernel where it runs, the reference otherwise.

    Example:
        >>> wt = torch.randn(576, 1536); wmt = wt * (torch.rand_like(wt) > 0.35)
        >>> y = tiered_gemv_packed(torch.randn(576), wt, *pack_medium_rows(wmt), 1.0, 0.3)
    """
    if x.dim() != 1 or wt.dim() != 2 or x.shape[0] != wt.shape[0] or mask.shape != (wt.shape[0], -(-wt.shape[1] // 8)):
        raise ValueError(f"tiered_gemv_packed expects x: [in], wt: [in, out] and mask: [in, ceil(out / 8)], got "
                         f"{tuple(x.shape)}, {tuple(wt.shape)} and {tuple(mask.shape)}")
    if not kernel_available(x, wt, values):
        return tiered_gemv_packed_reference(x, wt, mask, values, offsets, t_high, t_low)
    return extension().tiered_gemv_packed(x.contiguous(), wt.contiguous(), mask, values, offsets, float(t_high),
                                           float(t_low))


def sparse_gemv_reference(x: torch.Tensor, wt: torch.Tensor, threshold: float) -> torch.Tensor:
    """One tier: ``y = sum over |x_i| >= threshold of x_i * wt[i]``.

    Example:
        >>> sparse_gemv_reference(torch.tensor([1., 0.1]), torch.eye(2), 0.5)
        tensor([1., 0.])
    """
    return tiered_gemv_reference(x, wt, None, threshold, threshold)


SOURCE = Path(__file__).with_name("routed.cpp")


@functools.cache
def extension():
    """Build (once per environment; cached by the source's content) and return the C++ extension of ``routed.cpp``,
    or None if it cannot be built here (its ``sparsefx_cpu::*`` ops are registered when it loads)."""
    ext = try_load_extension("routed", SOURCE, "the C++ activation-sparse decode kernels")
    if ext is not None:
        _register_fake()
    return ext


def _register_fake() -> None:
    """Shapes of ``sparsefx_cpu::tiered_linear`` (defined in C++ by the extension) for tracing and Inductor."""

    @torch.library.register_fake("sparsefx_cpu::tiered_linear")
    def _(x, weight, weight_medium, bias, t_high, t_low):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("sparsefx_cpu::tiered_linear_packed")
    def _(x, weight, weight_medium, medium_mask, medium_values, medium_offsets, bias, t_high, t_low):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("sparsefx_cpu::multitier_linear")
    def _(x, weight, mediums, bias, thresholds):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("sparsefx_cpu::banded_linear")
    def _(x, weight, bias, thresholds):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def extension_runs(*tensors: torch.Tensor | None) -> bool:
    """Whether the C++ extension runs here (a CPU with AVX2/FMA/F16C, the extension compiled) and every given tensor
    lies on the CPU."""
    return (all(t.device.type == "cpu" for t in tensors if t is not None) and cpu_supports_kernels()
            and extension() is not None)


def cpp_tiered_linear():
    """The C++-registered op ``sparsefx_cpu::tiered_linear`` (same signature as ``sparsefx::tiered_linear``), or
    None where the extension cannot run (no AVX2/FMA/F16C, no compiler)."""
    return torch.ops.sparsefx_cpu.tiered_linear.default if extension_runs() else None


def cpp_multitier_linear():
    """The C++-registered op ``sparsefx_cpu::multitier_linear`` (same signature as ``sparsefx::multitier_linear``),
    or None where the extension cannot run."""
    return torch.ops.sparsefx_cpu.multitier_linear.default if extension_runs() else None


def cpp_banded_linear():
    """The C++-registered op ``sparsefx_cpu::banded_linear`` (same signature as ``sparsefx::banded_linear``), or None
    where the extension cannot run."""
    return torch.ops.sparsefx_cpu.banded_linear.default if extension_runs() else None


def cpp_tiered_linear_packed():
    """The C++-registered op ``sparsefx_cpu::tiered_linear_packed(x, weight, weight_medium, medium_mask,
    medium_values, medium_offsets, bias, t_high, t_low)``: ``tiered_linear`` whose one-token calls read the medium
    tier from its packed copy (``pack_medium_rows``); None where the extension cannot run."""
    return torch.ops.sparsefx_cpu.tiered_linear_packed.default if extension_runs() else None


def kernel_available(x: torch.Tensor, wt: torch.Tensor, wmt: torch.Tensor | None = None) -> bool:
    """Whether the C++ kernel takes these tensors (x and wt fp32, wmt fp32 or fp16, CPU with AVX2/FMA/F16C, and
    the extension compiled)."""
    dtypes_ok = (x.dtype == wt.dtype == torch.float32
                 and (wmt is None or wmt.dtype in (torch.float32, torch.float16)))
    return dtypes_ok and extension_runs(x, wt, wmt)


def tiered_gemv(x: torch.Tensor, wt: torch.Tensor, wmt: torch.Tensor | None, t_high: float,
                t_low: float) -> torch.Tensor:
    """Batch-1 DAWS GEMV reading only the kept rows of ``wt = W.T`` (high tier) and ``wmt = W_medium.T`` (medium).

    The C++ kernel for fp32 CPU tensors on AVX2, the reference otherwise.

    Example:
        >>> wt = torch.randn(576, 1536)                          # W.T of a 1536 x 576 Linear
        >>> y = tiered_gemv(torch.randn(576), wt, None, 0.7, 0.7)  # reads ~48% of wt's rows
    """
    if x.dim() != 1 or wt.dim() != 2 or x.shape[0] != wt.shape[0] or (wmt is not None and wmt.shape != wt.shape):
        raise ValueError(f"tiered_gemv expects x: [in] and wt, wmt: [in, out], got {tuple(x.shape)}, "
                         f"{tuple(wt.shape)} and {None if wmt is None else tuple(wmt.shape)}")
    if wmt is None:
        wmt, t_low = wt, t_high
    if not kernel_available(x, wt, wmt):
        return tiered_gemv_reference(x, wt, wmt, t_high, t_low)
    return extension().tiered_gemv(x.contiguous(), wt.contiguous(), wmt.contiguous(), float(t_high), float(t_low))


def multitier_gemv_reference(x: torch.Tensor, wt: torch.Tensor, wmts: list[torch.Tensor],
                             thresholds: list[float]) -> torch.Tensor:
    """Pure-torch reference of ``multitier_gemv``: ``x: [in]``, ``wt`` and each of ``wmts: [in, out]`` -> ``[out]``."""
    return multitier_linear_reference(x, wt.t(), [w.t() for w in wmts], None, thresholds)


def multitier_gemv(x: torch.Tensor, wt: torch.Tensor, wmts: list[torch.Tensor],
                   thresholds: list[float]) -> torch.Tensor:
    """Batch-1 GEMV of ``sparsefx::multitier_linear``: channel i reads row i of ``wt`` (|x_i| >= thresholds[0]) or of
    ``wmts[k]`` (thresholds[k + 1] <= |x_i| < thresholds[k]), or nothing. The C++ kernel where it runs, the
    reference otherwise.

    Example:
        >>> wt = torch.randn(576, 1536); wmts = [wt * (wt.abs() > 0.5), wt * (wt.abs() > 1.0)]
        >>> y = multitier_gemv(torch.randn(576), wt, wmts, [1.5, 0.8, 0.3])
    """
    if (x.dim() != 1 or wt.dim() != 2 or x.shape[0] != wt.shape[0] or any(w.shape != wt.shape for w in wmts)
            or len(thresholds) != len(wmts) + 1):
        raise ValueError(f"multitier_gemv expects x: [in], wt and each medium: [in, out], and one threshold more than "
                         f"mediums; got {tuple(x.shape)}, {tuple(wt.shape)}, {[tuple(w.shape) for w in wmts]} and "
                         f"{len(thresholds)} thresholds")
    if not all(kernel_available(x, wt, w) for w in wmts):
        return multitier_gemv_reference(x, wt, wmts, thresholds)
    return extension().multitier_gemv(x.contiguous(), wt.contiguous(), [w.contiguous() for w in wmts],
                                       [float(t) for t in thresholds])


def banded_gemv_reference(x: torch.Tensor, wt: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Pure-torch reference of ``banded_gemv``: ``x: [in]``, ``wt: [in, out]`` (banded, transposed) -> ``[out]``."""
    return banded_linear_reference(x, wt.t(), None, thresholds)


def banded_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Batch-1 GEMV of ``sparsefx::banded_linear`` over ``wt``, the banded matrix transposed (``[in, out]`` fp16,
    ``ops/routed/format.py``): channel i in tier k reads row i once, keeping the weights whose band is >= k. The C++
    kernel where it runs, the reference otherwise.

    Example:
        >>> from sparsefx.ops.routed.format import pack_bands
        >>> w = torch.randn(1536, 576); wt = pack_bands(w, [0.5, 1.0, 1.5]).t().contiguous()
        >>> y = banded_gemv(torch.randn(576), wt, [1.5, 0.8, 0.5, 0.3])
    """
    if (x.dim() != 1 or wt.dim() != 2 or x.shape[0] != wt.shape[0] or wt.dtype != torch.float16
            or not 2 <= len(thresholds) <= MAX_MEDIUMS + 1):
        raise ValueError(f"banded_gemv expects x: [in], wt: fp16 [in, out] and 2 to {MAX_MEDIUMS + 1} thresholds; got "
                         f"{tuple(x.shape)}, {wt.dtype} {tuple(wt.shape)} and {len(thresholds)} thresholds")
    if not (x.dtype == torch.float32 and extension_runs(x, wt)):
        return banded_gemv_reference(x, wt, thresholds)
    return extension().banded_gemv(x.contiguous(), wt.contiguous(), [float(t) for t in thresholds])


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: float) -> torch.Tensor:
    """Activation-sparse GEMV, one tier: channels with ``|x_i| >= threshold`` (see ``tiered_gemv``).

    Example:
        >>> y = sparse_gemv(torch.randn(576), torch.randn(576, 1536), 0.5)
    """
    if x.dim() != 1 or wt.dim() != 2 or x.shape[0] != wt.shape[0]:
        raise ValueError(f"sparse_gemv expects x: [in] and wt: [in, out], got {tuple(x.shape)} and {tuple(wt.shape)}")
    return tiered_gemv(x, wt, None, threshold, threshold)


# ---------------------------------------------------------------- the ops' CPU kernels and the decode preparation

def tiered_linear_cpu(x, weight, weight_medium, bias, t_high, t_low):
    """``sparsefx::tiered_linear``'s CPU kernel: the C++ op decides (one token on transposed storage with a non-zero
    threshold takes the GEMV, everything else the default math); without the extension, the default math here."""
    op = cpp_tiered_linear()
    if op is None:
        return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)
    return op(x, weight, weight_medium, bias, t_high, t_low)


def multitier_linear_cpu(x, weight, mediums, bias, thresholds):
    check_multitier_args(x, weight, mediums, thresholds)
    op = cpp_multitier_linear()
    if op is None:
        return multitier_linear_math(x, weight, mediums, bias, thresholds)
    return op(x, weight, mediums, bias, thresholds)


def banded_linear_cpu(x, weight, bias, thresholds):
    check_banded_args(x, weight, thresholds)
    op = cpp_banded_linear()
    if op is None:
        return banded_linear_math(x, weight, bias, thresholds)
    return op(x, weight, bias, thresholds)


def kernel_pays(module) -> bool:
    """False only when ``sparsefx autotune --kernels cpu`` measured that the sparse kernel never beats the dense
    GEMV for this shape (no entry: assume it pays, as measured on the shapes of bench/kernel_sparse_gemv.py)."""
    tuned = lookup("cpu_tiered_gemv", "cpu", (module.in_features, module.out_features))
    return tuned is None or tuned.get("min_sparsity") is not None


# With pack_medium, a pruned medium tier is bitmask-packed when at most this share of its weights is non-zero (a
# packed row reads density * itemsize + 1/8 bytes per column).
PACK_MAX_DENSITY = 0.8


def _packed_decode(kernel):
    """A ``decode_kernel`` for a packed medium tier: the extension's ``kernel`` (``tiered_gemv_packed``), bound once
    at preparation, taking the ``(mask, values, offsets)`` triple as the medium argument."""

    def decode(x, wt, medium, t_high, t_low):
        return kernel(x, wt, *medium, t_high, t_low)

    return decode


def _multitier_decode(kernel, mediums):
    """A ``decode_kernel`` for a ``MultiTierLinear``: the extension's ``multitier_gemv`` with the medium tiers'
    transposed views bound once at preparation (no list built per call)."""
    wmts = [m.t() for m in mediums]

    def decode(x, wt, thresholds):
        return kernel(x, wt, wmts, thresholds)

    return decode


def prepare_tiered(module, pack_medium: bool = False, **_) -> None:
    """Re-store a ``TieredLinear`` transposed and bind its one-token kernel (``tiered_gemv``, or
    ``tiered_gemv_packed`` over a bitmask-packed copy of a pruned medium tier with ``pack_medium``)."""
    own_medium = module.has_medium_weights
    transpose_weight(module)
    module.weight_medium = transposed_storage(module.weight_medium) if own_medium else module.weight.data
    x_like = module.weight.new_empty(module.in_features)  # decode inputs share the weight's dtype
    module.medium_packed = None
    if kernel_available(x_like, module.weight, module.weight_medium) and kernel_pays(module):
        ext = extension()
        module.decode_kernel = ext.tiered_gemv
        wmt = module.weight_medium.t()
        if pack_medium and own_medium and (wmt != 0).float().mean() <= PACK_MAX_DENSITY:
            module.medium_packed = pack_medium_rows(wmt)
            module.decode_kernel = _packed_decode(ext.tiered_gemv_packed)


def prepare_multitier(module, **_) -> None:
    """Re-store a ``MultiTierLinear`` (weight and every medium) transposed and bind ``multitier_gemv``."""
    transpose_weight(module)
    for k, wm in enumerate(module.mediums):
        setattr(module, f"medium_{k}", transposed_storage(wm))
    x_like = module.weight.new_empty(module.in_features)
    if all(kernel_available(x_like, module.weight, wm) for wm in module.mediums) and kernel_pays(module):
        module.decode_kernel = _multitier_decode(extension().multitier_gemv, module.mediums)


def prepare_banded(module, **_) -> None:
    """Re-store a ``BandedLinear``'s banded matrix transposed and bind ``banded_gemv``."""
    module.weight_banded = transposed_storage(module.weight_banded)
    if extension_runs(module.weight_banded) and kernel_pays(module):
        module.decode_kernel = extension().banded_gemv
