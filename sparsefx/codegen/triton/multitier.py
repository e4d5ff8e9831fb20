"""DAWS with several medium tiers stored apart (``daws.medium_tiers``, ``layout: separate``) as a Triton kernel.

Semantics (``sparsefx::multitier_linear``, reference ``multitier_linear_reference`` in ``ir/ops.py``): channel i in
tier k (``thresholds[k] <= |x_i| < thresholds[k-1]``; tier 0: ``|x_i| >= thresholds[0]``) multiplies column i of
the full weights (tier 0) or of medium k; below the last threshold it is dropped.

Decode (one token): the GEMV reads ``Wt`` and each medium transposed (``[in, out]``, strides passed); every tier
issues its own masked load, and the tiers are exclusive, so a kept row is fetched once, from its own matrix — the
matrices may differ in dtype (fp32 weights beside fp16 mediums). Up to three medium tiers (more: the op's default
math). Grid and K split as the tiered GEMV (``tiered.default_gemv_config``; fp32 atomics when split). Batch > 1 runs
the op's default math.
"""

from __future__ import annotations

import torch

from . import check_device
from .tiered import ROUTED_THRESHOLDS, launch_routed_gemv

MAX_MEDIUMS = ROUTED_THRESHOLDS - 1


def multitier_gemv(x: torch.Tensor, wt: torch.Tensor, wmts: list[torch.Tensor], thresholds: list[float],
                   config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token through ``multitier_linear``: ``x: [in]``, ``wt`` and each of ``wmts`` ``[in, out]`` (transposed,
    any strides), one threshold more than mediums (descending) -> ``y: [out]`` in x's dtype (fp32 accumulation).

    Example:
        >>> wt = torch.randn(64, 32); wmts = [wt * (wt.abs() > 0.5), wt * (wt.abs() > 1.0)]
        >>> y = multitier_gemv(torch.randn(64), wt, wmts, [1.5, 0.7, 0.3])  # doctest: +SKIP
    """
    from . import _multitier_jit

    check_device(x, wt, *wmts)
    if x.dim() != 1 or wt.dim() != 2 or wt.shape[0] != x.shape[0] or any(w.shape != wt.shape for w in wmts):
        raise ValueError(f"multitier_gemv: x must be [in] and wt and every medium [in, out]; got {tuple(x.shape)}, "
                         f"{tuple(wt.shape)} and {[tuple(w.shape) for w in wmts]}")
    if not 1 <= len(wmts) <= MAX_MEDIUMS or len(thresholds) != len(wmts) + 1:
        raise ValueError(f"multitier_gemv: 1 to {MAX_MEDIUMS} mediums and one threshold more; got {len(wmts)} "
                         f"mediums and {len(thresholds)} thresholds")
    k, n = wt.shape
    mats = [wt, *wmts] + [wmts[0]] * (MAX_MEDIUMS - len(wmts))        # unused slots: never loaded
    strides = [s for m in mats for s in (m.stride(0), m.stride(1))]
    return launch_routed_gemv(_multitier_jit.gemv, "tiered_gemv", x, k, n, thresholds, mats, strides, config, out)


@torch.library.custom_op("sparsefx::triton_multitier_linear", mutates_args=())
def triton_multitier_linear(x: torch.Tensor, weight: torch.Tensor, mediums: list[torch.Tensor],
                            bias: torch.Tensor | None, thresholds: list[float]) -> torch.Tensor:
    """``sparsefx::multitier_linear`` through the Triton kernel (same signature; what the backend lowers it to): one
    token with at most three mediums -> ``multitier_gemv``; anything else -> the op's default math."""
    from ...ir.ops import check_multitier_args, multitier_linear_math

    check_multitier_args(x, weight, mediums, thresholds)
    if x.numel() != x.shape[-1] or len(mediums) > MAX_MEDIUMS:
        return multitier_linear_math(x, weight, mediums, bias, thresholds)
    y = multitier_gemv(x.reshape(-1), weight.t(), [m.t() for m in mediums], thresholds)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@triton_multitier_linear.register_fake
def _(x, weight, mediums, bias, thresholds):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


__all__ = ["MAX_MEDIUMS", "multitier_gemv", "triton_multitier_linear"]
