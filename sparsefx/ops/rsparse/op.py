"""R-Sparse's op ``sparse_lowrank_linear``: schema, fake and the torch reference."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ...ir.annotate import register_linear_op


@torch.library.custom_op("sparsefx::sparse_lowrank_linear", mutates_args=())
def sparse_lowrank_linear(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor | None, t: float) -> torch.Tensor:
    """R-Sparse linear: channels with ``|x_i| >= t`` use the full weights, the rest the rank-r factors ``u @ v``.

    x: [..., in], weight: [out, in], u: [out, r], v: [r, in]. With ``t = 0`` the result is ``F.linear(x, W, b)``.

    Example:
        >>> w = torch.eye(2); u, v = torch.ones(2, 1), torch.ones(1, 2)
        >>> torch.ops.sparsefx.sparse_lowrank_linear(torch.tensor([[3., 0.5]]), w, u, v, None, 1.0)
        tensor([[3.5000, 0.5000]])
    """
    keep = x.abs() >= t
    y = F.linear(torch.where(keep, x, 0.0), weight)
    if t > 0:
        y = y + F.linear(F.linear(torch.where(keep, 0.0, x), v), u)
    return y if bias is None else y + bias


@sparse_lowrank_linear.register_fake
def _(x, weight, u, v, bias, t):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_lowrank_linear: x and weight disagree on in_features")
    torch._check(u.shape[0] == weight.shape[0] and v.shape[1] == weight.shape[1] and u.shape[1] == v.shape[0],
                 lambda: "sparse_lowrank_linear: u must be [out, r] and v [r, in]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def sparse_lowrank_linear_reference(x, weight, u, v, bias, t):
    keep = (x.abs() >= t).to(x.dtype)
    y = (x * keep) @ weight.T + ((x * (1 - keep)) @ v.T) @ u.T
    return y if bias is None else y + bias


register_linear_op(torch.ops.sparsefx.sparse_lowrank_linear.default)   # linear-like: found by ir.linear_nodes
