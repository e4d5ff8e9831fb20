"""Named views of the routed ops' node arguments (instead of positions): the DAWS pass writes thresholds through
them, lowering reads the tensors through them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ArgsView


@dataclass
class TieredArgs(ArgsView):
    op_name = "tiered_linear"
    x: Any
    weight: Any
    weight_medium: Any
    bias: Any
    t_high: float
    t_low: float

    @property
    def thresholds(self) -> list[float]:
        return [self.t_high, self.t_low]

    def set_thresholds(self, node, thresholds) -> None:
        self.update(node, t_high=thresholds[0], t_low=thresholds[1])


@dataclass
class MultitierArgs(ArgsView):
    op_name = "multitier_linear"
    x: Any
    weight: Any
    mediums: Any
    bias: Any
    thresholds: list

    def set_thresholds(self, node, thresholds) -> None:
        self.update(node, thresholds=list(thresholds))


@dataclass
class BandedArgs(ArgsView):
    op_name = "banded_linear"
    x: Any
    weight: Any
    bias: Any
    thresholds: list

    def set_thresholds(self, node, thresholds) -> None:
        self.update(node, thresholds=list(thresholds))


__all__ = ["BandedArgs", "MultitierArgs", "TieredArgs"]
