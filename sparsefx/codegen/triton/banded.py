"""DAWS over the banded layout (``daws.layout: banded``) as a Triton kernel.

Semantics (``sparsefx::banded_linear``, reference ``banded_linear_reference`` in ``ir/ops.py``): the weight is one
fp16 matrix whose two low mantissa bits are each weight's band (``ir/bandformat.py``); channel i in tier k
(``thresholds[k] <= |x_i| < thresholds[k-1]``; tier 0: ``|x_i| >= thresholds[0]``) multiplies the weights of its
column whose band is >= k, and dropped channels (below the last threshold) nothing.

Decode (one token): the GEMV reads ``Wt`` (the banded matrix transposed, ``[in, out]``; strides are passed) with
the rows of dropped channels masked out of the load, so they are never fetched, and zeroes the loaded weights whose
band is below their row's tier — one fp16 stream for every tier. The grid and its K split are those of the tiered
GEMV (``tiered.default_gemv_config``, or what ``sparsefx autotune`` stored for ``banded_gemv`` and the shape; fp32
partial sums added with fp32 atomics). Batch > 1 runs the op's default
math (one masked GEMM per tier); a union-of-kept-channels GEMM like ``tiered_gemm`` is not written for this layout.
"""

from __future__ import annotations

import torch

from . import check_device
from .tiered import launch_routed_gemv


def banded_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: list[float], config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One token through ``banded_linear``: ``x: [in]``, ``wt: [in, out]`` (the banded fp16 matrix transposed, any
    strides), 2 to 4 descending thresholds -> ``y: [out]`` in x's dtype (fp32 accumulation). ``out``: an fp32
    ``[out]`` buffer to write (tests poison it).

    Example:
        >>> from sparsefx.ir.bandformat import pack_bands
        >>> wt = pack_bands(torch.randn(32, 64), [0.5, 1.0]).t()
        >>> y = banded_gemv(torch.randn(64), wt, [1.5, 0.7, 0.3])  # doctest: +SKIP
    """
    from . import _banded_jit
    from ...ir.bandformat import MAX_MEDIUMS

    check_device(x, wt)
    if x.dim() != 1 or wt.dim() != 2 or wt.shape[0] != x.shape[0] or wt.dtype != torch.float16:
        raise ValueError(f"banded_gemv: x must be [in] and wt fp16 [in, out]; got {tuple(x.shape)} and {wt.dtype} "
                         f"{tuple(wt.shape)}")
    if not 2 <= len(thresholds) <= MAX_MEDIUMS + 1:
        raise ValueError(f"banded_gemv: expected 2 to {MAX_MEDIUMS + 1} thresholds, got {len(thresholds)}")
    k, n = wt.shape
    return launch_routed_gemv(_banded_jit.gemv, "banded_gemv", x, k, n, thresholds, [wt],
                              [wt.stride(0), wt.stride(1)], config, out)


@torch.library.custom_op("sparsefx::triton_banded_linear", mutates_args=())
def triton_banded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         thresholds: list[float]) -> torch.Tensor:
    """``sparsefx::banded_linear`` through the Triton kernel (same signature; what the backend lowers it to): one
    token -> ``banded_gemv``; more rows -> the op's default math."""
    from ...ir.ops import banded_linear_math, check_banded_args

    check_banded_args(x, weight, thresholds)
    if x.numel() != x.shape[-1]:
        return banded_linear_math(x, weight, bias, thresholds)
    y = banded_gemv(x.reshape(-1), weight.t(), thresholds).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@triton_banded_linear.register_fake
def _(x, weight, bias, thresholds):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


__all__ = ["banded_gemv", "triton_banded_linear"]
