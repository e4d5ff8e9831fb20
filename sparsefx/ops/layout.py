"""Weight layouts the CPU decode kernels read: ``W: [out, in]`` stored as a contiguous ``[in, out]`` (each input
channel's weights one contiguous row) and viewed back as ``[out, in]`` — the same tensor to every other reader."""

from __future__ import annotations

import torch
from torch import nn


def rows_are_channels(w: torch.Tensor) -> bool:
    """``w: [out, in]`` stored as a contiguous ``[in, out]``."""
    return w.dim() == 2 and w.t().is_contiguous()


def transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` re-stored so that ``rows_are_channels`` holds (``t`` itself if it already does)."""
    return t if rows_are_channels(t) else t.t().contiguous().t()


def transpose_weight(module: nn.Module) -> None:
    """Re-store ``module.weight`` as a contiguous ``[in, out]`` viewed ``[out, in]`` (what the decode kernels read)."""
    module.weight = nn.Parameter(transposed_storage(module.weight.data), requires_grad=module.weight.requires_grad)


__all__ = ["rows_are_channels", "transpose_weight", "transposed_storage"]
