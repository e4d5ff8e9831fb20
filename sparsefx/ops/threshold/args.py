"""Named view of ``threshold``'s node arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ArgsView


@dataclass
class ThresholdArgs(ArgsView):
    op_name = "threshold"
    x: Any
    t: float


__all__ = ["ThresholdArgs"]
