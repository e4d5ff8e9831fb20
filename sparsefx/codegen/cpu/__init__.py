"""CPU kernels for the compressed ops, and the step that prepares a compressed model to use them.

``prepare_cpu_decode(model)`` re-stores each ``TieredLinear``'s weights transposed (``W.T`` row-contiguous, the
same tensor viewed as ``[out, in]``, so no memory is added and prefill GEMMs still read it) and registers the CPU
kernel of ``sparsefx::tiered_linear``: single-token calls then read only the kept rows (``sparse_gemv``). A
``MultiTierLinear`` (several medium tiers) is re-stored and served the same way (``multitier_gemv``), and a
``BandedLinear`` (every tier in one banded fp16 matrix) has that matrix re-stored transposed (``banded_gemv``). Eager
``TieredLinear`` modules call the C++ kernel directly for one token, skipping the op dispatcher. It also registers
the CPU kernels of ``sparsefx::quant_linear`` and ``lowrank_quant_linear`` (``quant_gemv``): up to ``MAX_ROWS``
tokens, they multiply straight from the packed codes instead of dequantizing the whole weight per call; prepared
quantized modules call those ops' C++-registered twins directly.

Linears left dense (the LM head above all: 49152 x 576 in SmolLM2, a quarter of the dense model's bytes and most of
a 3-bit model's) are re-stored transposed too, tied embeddings with them. The op stays ``F.linear``, but MKL's
one-token product over a contiguous ``[in, out]`` streams the weight at close to the read bandwidth, where over
``[out, in]`` rows it reaches about half of it (``bench/decode_e2e.py``, ``dense-prepared``). Prefill GEMMs read
either layout at the same speed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _rows_are_channels(w: torch.Tensor) -> bool:
    """``w: [out, in]`` stored as a contiguous ``[in, out]`` (each input channel's weights one contiguous row)."""
    return w.dim() == 2 and w.t().is_contiguous()


def _tiered_linear_cpu(x, weight, weight_medium, bias, t_high, t_low):
    from ...ir.ops import tiered_linear_math
    from .sparse_gemv import cpp_tiered_linear

    # The C++ op decides: decode (one token) on transposed storage with a non-zero threshold takes the kernel,
    # everything else the default math. Without the extension, the default math here.
    op = cpp_tiered_linear()
    if op is None:
        return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)
    return op(x, weight, weight_medium, bias, t_high, t_low)


def _multitier_linear_cpu(x, weight, mediums, bias, thresholds):
    from ...ir.ops import check_multitier_args, multitier_linear_math
    from .sparse_gemv import cpp_multitier_linear

    check_multitier_args(x, weight, mediums, thresholds)
    op = cpp_multitier_linear()
    if op is None:
        return multitier_linear_math(x, weight, mediums, bias, thresholds)
    return op(x, weight, mediums, bias, thresholds)


def _banded_linear_cpu(x, weight, bias, thresholds):
    from ...ir.ops import banded_linear_math, check_banded_args
    from .sparse_gemv import cpp_banded_linear

    check_banded_args(x, weight, thresholds)
    op = cpp_banded_linear()
    if op is None:
        return banded_linear_math(x, weight, bias, thresholds)
    return op(x, weight, bias, thresholds)


def _quant_linear_cpu(x, packed, scales, zeros, bias, bits, group_size):
    from ...ir.ops import quant_linear_math
    from .quant_gemv import kernel_available, quant_matmul

    # Decode and small batches read the packed codes; prefill dequantizes once and runs MKL's GEMM.
    if not kernel_available(x, packed, scales, zeros, bits):
        return quant_linear_math(x, packed, scales, zeros, bias, bits, group_size)
    y = quant_matmul(x, packed, scales, zeros, bits, group_size)
    return y if bias is None else y + bias


def _lowrank_quant_linear_cpu(x, packed, scales, zeros, at_packed, at_scales, at_zeros, d, b_packed, b_scales,
                              b_zeros, bias, bits, group_size, factor_bits, factor_group):
    from ...ir.ops import lowrank_quant_linear_math
    from .quant_gemv import kernel_available, lowrank_quant_matmul, quant_matmul, takes_input

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


@functools.cache
def enable_cpu_kernels() -> None:
    """Register the CPU kernels of ``sparsefx::tiered_linear``, ``multitier_linear``, ``banded_linear``,
    ``quant_linear`` and ``lowrank_quant_linear`` (once; later calls do nothing). Each falls back to the op's default
    implementation where it does not apply."""
    from ...ir.ops import banded_linear, lowrank_quant_linear, multitier_linear, quant_linear, tiered_linear

    tiered_linear.register_kernel("cpu")(_tiered_linear_cpu)
    multitier_linear.register_kernel("cpu")(_multitier_linear_cpu)
    banded_linear.register_kernel("cpu")(_banded_linear_cpu)
    quant_linear.register_kernel("cpu")(_quant_linear_cpu)
    lowrank_quant_linear.register_kernel("cpu")(_lowrank_quant_linear_cpu)


def _transposed_storage(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_are_channels(t) else t.t().contiguous().t()


def _transpose_weight(module: nn.Module) -> None:
    """Re-store ``module.weight`` as a contiguous ``[in, out]`` viewed ``[out, in]`` (what the decode kernels read)."""
    module.weight = nn.Parameter(_transposed_storage(module.weight.data), requires_grad=module.weight.requires_grad)


def _kernel_pays(module) -> bool:
    """False only when ``sparsefx autotune --kernels cpu`` measured that the sparse kernel never beats the dense
    GEMV for this shape (no entry: assume it pays, as measured on the shapes of bench/kernel_sparse_gemv.py)."""
    from ..autotune import lookup

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


def _restore_dense_linears(model: nn.Module) -> int:
    """Re-store every plain ``nn.Linear`` weight transposed (see the module docstring); a parameter shared with other
    modules (tied input embeddings) is replaced in all of them, so the tie and the memory stay as they were. Return
    how many weights were re-stored."""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2 and min(w.shape) > 1 \
                and not _rows_are_channels(w):
            fresh.setdefault(id(w), nn.Parameter(_transposed_storage(w.data), requires_grad=w.requires_grad))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in fresh:
                setattr(module, name, fresh[id(p)])
    return len(fresh)


@torch.no_grad()
def prepare_cpu_decode(model: nn.Module, pack_medium: bool = False, dense_linears: bool = True,
                       int8_activations: bool = False) -> int:
    """Re-store compressed linears for the CPU decode kernel; return how many were prepared.

    With ``pack_medium``, a DAWS medium tier whose weights are pruned (density <= ``PACK_MAX_DENSITY``) also gets a
    bitmask-packed copy that one-token calls read instead of its dense rows (the dense tensor stays for prefill).
    Off by default: on this AVX2 CPU the expansion costs more than the bytes it saves — packed rows measured slower
    than dense fp16 rows (``daws.medium_dtype: float16``) at every shape of ``bench/kernel_daws_gemv.py``.
    With ``dense_linears`` (the default), plain ``nn.Linear`` weights are re-stored transposed as well (not counted
    in the return value). Outputs equal the unprepared model's up to fp32 summation order.
    With ``int8_activations``, quantized linears (``QuantLinear``: RTN, GPTQ; ``LowRankQuantLinear``: DAM) decode
    with their input rounded to int8 per 32 channels (``quant_gemv.quant_matmul_q8``, ``lowrank_quant_matmul_q8``):
    faster, and no longer equal to prefill's outputs — check the model with
    ``sparsefx eval --decode-path --int8-activations``.

    Example:
        >>> prepare_cpu_decode(compressed_model)  # doctest: +SKIP
        210
    """
    from ..eager import BandedLinear, LowRankQuantLinear, MultiTierLinear, QuantLinear, TieredLinear
    from .quant_gemv import cpp_lowrank_quant_linear, cpp_quant_linear
    from .sparse_gemv import _extension, extension_runs, kernel_available, pack_medium as pack

    enable_cpu_kernels()
    count = 0
    for module in model.modules():
        if isinstance(module, (QuantLinear, LowRankQuantLinear)):
            # packed storage is what the kernel reads: nothing to re-store. The module calls the C++-registered op
            # (same signature; no Python between the call and the kernel), or the Python kernel without it.
            quant = isinstance(module, QuantLinear)
            module.decode_kernel = ((cpp_quant_linear if quant else cpp_lowrank_quant_linear)(int8_activations)
                                    or (_quant_linear_cpu if quant else _lowrank_quant_linear_cpu))
            count += 1
        elif isinstance(module, TieredLinear):
            own_medium = module.has_medium_weights
            _transpose_weight(module)
            module.weight_medium = _transposed_storage(module.weight_medium) if own_medium else module.weight.data
            x_like = module.weight.new_empty(module.in_features)  # decode inputs share the weight's dtype
            module.medium_packed = None
            if kernel_available(x_like, module.weight, module.weight_medium) and _kernel_pays(module):
                ext = _extension()
                module.decode_kernel = ext.tiered_gemv
                wmt = module.weight_medium.t()
                if pack_medium and own_medium and (wmt != 0).float().mean() <= PACK_MAX_DENSITY:
                    module.medium_packed = pack(wmt)
                    module.decode_kernel = _packed_decode(ext.tiered_gemv_packed)
            count += 1
        elif isinstance(module, MultiTierLinear):
            _transpose_weight(module)
            for k, wm in enumerate(module.mediums):
                setattr(module, f"medium_{k}", _transposed_storage(wm))
            x_like = module.weight.new_empty(module.in_features)
            if all(kernel_available(x_like, module.weight, wm) for wm in module.mediums) and _kernel_pays(module):
                module.decode_kernel = _multitier_decode(_extension().multitier_gemv, module.mediums)
            count += 1
        elif isinstance(module, BandedLinear):
            module.weight_banded = _transposed_storage(module.weight_banded)
            if extension_runs(module.weight_banded) and _kernel_pays(module):
                module.decode_kernel = _extension().banded_gemv
            count += 1
    if dense_linears:
        _restore_dense_linears(model)
    return count
