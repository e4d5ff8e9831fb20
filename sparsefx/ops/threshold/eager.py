"""Eager module of ``threshold`` (CATS's thresholded activation) and the lowering of its node."""

from __future__ import annotations

import torch
from torch import nn

from ...ir.meta import MODULE
from . import op as _op  # noqa: F401  (defines the op)
from .args import ThresholdArgs


class ThresholdedAct(nn.Module):
    """An activation followed by ``sparsefx::threshold`` (CATS): outputs with ``|a| < t`` become zero."""

    kind = "thresholded_act"

    def __init__(self, act: nn.Module, t: float):
        super().__init__()
        self.act, self.t = act, float(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsefx.threshold(self.act(x), self.t)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"t": self.t}, {}

    @classmethod
    def restore(cls, act: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "ThresholdedAct":
        return cls(act, attrs["t"])

    def extra_repr(self) -> str:
        return f"t={self.t:.4g}"



def threshold_to_eager(gm, node, model: nn.Module):
    name = node.meta.get(MODULE)
    if name is None:
        raise NotImplementedError(f"threshold node {node.name!r} has no HF module to replace (the activation is "
                                  "a function call, not a module); sparsefx cannot lower it to the eager model")
    current = model.get_submodule(name)
    if isinstance(current, ThresholdedAct):
        return name, current
    if any(True for _ in current.parameters()):  # the activation is a call inside a bigger module (e.g. the MLP)
        raise NotImplementedError(f"threshold node {node.name!r}: the activation is computed inside {name!r}, not by "
                                  "a module of its own; sparsefx cannot lower it to the eager model")
    return name, ThresholdedAct(current, ThresholdArgs.from_node(node).t)

