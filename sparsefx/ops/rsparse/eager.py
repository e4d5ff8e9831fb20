"""Eager module of ``sparse_lowrank_linear`` (R-Sparse) and the lowering of its node."""

from __future__ import annotations

import torch
from torch import nn

from ...ir.annotate import LINEAR
from . import op as _op  # noqa: F401  (defines the op)
from .args import SparseLowRankArgs


class SparseLowRankLinear(nn.Module):
    """Eager twin of ``sparsefx::sparse_lowrank_linear`` (R-Sparse): channels with ``|x_i| >= t`` use the full
    weights, the others the rank-r factors ``u: [out, r]``, ``v: [r, in]``."""

    kind = "sparse_lowrank_linear"

    def __init__(self, weight: nn.Parameter, u: torch.Tensor, v: torch.Tensor, bias, t: float):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.t = float(t)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.sparsefx.sparse_lowrank_linear(x, self.weight, self.u, self.v, self.bias, self.t)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"t": self.t}, {"u": self.u, "v": self.v}

    @classmethod
    def restore(cls, linear: nn.Linear, attrs: dict, tensors: dict[str, torch.Tensor]) -> "SparseLowRankLinear":
        u, v = tensors["u"], tensors["v"]
        out_f, in_f = linear.weight.shape
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != out_f or v.shape[1] != in_f or u.shape[1] != v.shape[0]:
            raise ValueError(f"low-rank factors {tuple(u.shape)} x {tuple(v.shape)} do not fit a {out_f}x{in_f} linear")
        return cls(linear.weight, u.to(linear.weight), v.to(linear.weight), linear.bias, attrs["t"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.u.shape[1]}, t={self.t:.4g}"



def sparse_lowrank_to_eager(gm, node, model: nn.Module):
    a = SparseLowRankArgs.from_node(node)
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    return name, SparseLowRankLinear(current.weight, gm.get_buffer(str(a.u.target)), gm.get_buffer(str(a.v.target)),
                                     current.bias, a.t)
