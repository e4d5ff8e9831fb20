"""Named view of ``nm_linear``'s node arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ArgsView


@dataclass
class NMArgs(ArgsView):
    op_name = "nm_linear"
    x: Any
    values: Any
    index: Any
    bias: Any
    n: int
    m: int


__all__ = ["NMArgs"]
