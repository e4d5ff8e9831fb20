"""CPU kernels for the compressed ops, and the step that prepares a compressed model to use them.

``prepare_cpu_decode(model)`` re-stores each ``TieredLinear``'s weights transposed (``W.T`` row-contiguous, the
same tensor viewed as ``[out, in]``, so no memory is added and prefill GEMMs still read it) and registers the CPU
kernel of ``sparsefx::tiered_linear``: single-token calls then read only the kept rows (``sparse_gemv``). Eager
``TieredLinear`` modules call the C++ kernel directly for one token, skipping the op dispatcher.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def _rows_are_channels(w: torch.Tensor) -> bool:
    """``w: [out, in]`` stored as a contiguous ``[in, out]`` (each input channel's weights one contiguous row)."""
    return w.dim() == 2 and w.t().is_contiguous()


def _tiered_linear_cpu(x, weight, weight_medium, bias, t_high, t_low):
    from ...ir.ops import tiered_linear_math
    from .sparse_gemv import kernel_available, tiered_gemv

    # Decode (one token) on transposed storage takes the kernel; zero thresholds stay on the exact dense path.
    if (x.numel() == x.shape[-1] and (t_high > 0 or t_low > 0) and _rows_are_channels(weight)
            and _rows_are_channels(weight_medium) and kernel_available(x, weight, weight_medium)):
        y = tiered_gemv(x.reshape(-1), weight.t(), weight_medium.t(), t_high, t_low).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)


@functools.cache
def enable_cpu_kernels() -> None:
    """Register the CPU kernel of ``sparsefx::tiered_linear`` (once; later calls do nothing)."""
    from ...ir.ops import tiered_linear

    tiered_linear.register_kernel("cpu")(_tiered_linear_cpu)


def _transposed_storage(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_are_channels(t) else t.t().contiguous().t()


def _kernel_pays(module) -> bool:
    """False only when ``sparsefx autotune --kernels cpu`` measured that the sparse kernel never beats the dense
    GEMV for this shape (no entry: assume it pays, as measured on the shapes of bench/kernel_sparse_gemv.py)."""
    from ..autotune import lookup

    tuned = lookup("cpu_tiered_gemv", "cpu", (module.in_features, module.out_features))
    return tuned is None or tuned.get("min_sparsity") is not None


@torch.no_grad()
def prepare_cpu_decode(model: nn.Module) -> int:
    """Re-store compressed linears for the CPU decode kernel; return how many were prepared.

    Outputs equal the unprepared model's up to fp32 summation order.

    Example:
        >>> prepare_cpu_decode(compressed_model)  # doctest: +SKIP
        210
    """
    from ..eager import TieredLinear
    from .sparse_gemv import _extension, kernel_available

    enable_cpu_kernels()
    count = 0
    for module in model.modules():
        if isinstance(module, TieredLinear):
            own_medium = module.has_medium_weights
            module.weight = nn.Parameter(_transposed_storage(module.weight.data),
                                         requires_grad=module.weight.requires_grad)
            module.weight_medium = _transposed_storage(module.weight_medium) if own_medium else module.weight.data
            x_like = module.weight.new_empty(module.in_features)  # decode inputs share the weight's dtype
            if kernel_available(x_like, module.weight, module.weight_medium) and _kernel_pays(module):
                module.decode_kernel = _extension().tiered_gemv
            count += 1
    return count
