"""CATS's op ``threshold`` (a thresholded activation; not linear-like): schema and fake. Its one implementation is
the torch math below, which is also its reference."""

from __future__ import annotations

import torch


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


def threshold_reference(x, t):
    """The op's semantics as plain torch."""
    return torch.where(x.abs() >= t, x, 0.0)
