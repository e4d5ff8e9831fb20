"""Named view of ``sparse_lowrank_linear``'s node arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ArgsView


@dataclass
class SparseLowRankArgs(ArgsView):
    op_name = "sparse_lowrank_linear"
    x: Any
    weight: Any
    u: Any
    v: Any
    bias: Any
    t: float


__all__ = ["SparseLowRankArgs"]
