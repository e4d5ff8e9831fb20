"""Eager module of ``nm_linear`` and the lowering of its node."""

from __future__ import annotations

import torch
from torch import nn

from ...ir.annotate import LINEAR
from . import op as _op  # noqa: F401  (defines the op)
from .args import NMArgs


class NMLinear(nn.Module):
    """Eager twin of ``sparsefx::nm_linear``: an N:M sparse weight stored packed (``ops/nm/format.py``: values +
    uint8 in-group indices) instead of dense, so the model and its artifact shrink (2:4 in fp32: 2.5 bytes per
    weight instead of 4)."""

    kind = "nm_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, values: torch.Tensor, index: torch.Tensor, bias: nn.Parameter | None, n: int, m: int):
        super().__init__()
        self.bias, self.n, self.m = bias, int(n), int(m)
        self.out_features, self.in_features = values.shape[0], values.shape[1] * self.m // self.n
        self.register_buffer("nm_values", values, persistent=False)
        self.register_buffer("nm_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.sparsefx.nm_linear(x, self.nm_values, self.nm_index, self.bias, self.n, self.m)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"n": self.n, "m": self.m}, {"nm_values": self.nm_values, "nm_index": self.nm_index}

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "NMLinear":
        n, m = int(attrs["n"]), int(attrs["m"])
        if not 0 < n < m:
            raise ValueError(f"N:M state with n={n}, m={m}: need 0 < n < m")
        values, index = tensors["nm_values"], tensors["nm_index"]
        if (values.shape != index.shape or index.dtype != torch.uint8 or values.shape[0] != linear.out_features
                or values.shape[1] * m != linear.in_features * n):
            raise ValueError(f"{n}:{m} state (values {tuple(values.shape)}, index {tuple(index.shape)} "
                             f"{index.dtype}) does not fit a {linear.out_features}x{linear.in_features} linear")
        if index.numel() and int(index.max()) >= m:
            raise ValueError(f"{n}:{m} state has an in-group index >= {m}")
        return cls(values, index, linear.bias, n, m)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pattern={self.n}:{self.m}"



def nm_to_eager(gm, node, model: nn.Module):
    a = NMArgs.from_node(node)
    name = node.meta[LINEAR].module
    return name, NMLinear(gm.get_buffer(str(a.values.target)), gm.get_buffer(str(a.index.target)),
                          model.get_submodule(name).bias, a.n, a.m)
