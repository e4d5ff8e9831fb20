"""The N:M op ``nm_linear`` (values + uint8 in-group index, ``format.py``): schema, fake, default math."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ...ir.annotate import register_linear_op

from .format import input_columns, unpack_nm


@torch.library.custom_op("sparsefx::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None, n: int,
              m: int) -> torch.Tensor:
    """Linear with an N:M sparse weight stored as ``values`` + uint8 in-group ``index`` (``format.py``).

    Reference: up to 8 rows (decode) gather x at each kept weight's input and sum — the weights are read once, as
    values and indices; more rows unpack the dense weight and run one GEMM.

    Example:
        >>> from sparsefx.ops.nm.format import pack_nm
        >>> v, i = pack_nm(torch.tensor([[0., 2., 0., 3.]]), 2, 4)
        >>> torch.ops.sparsefx.nm_linear(torch.tensor([[1., 1., 1., 2.]]), v, i, None, 2, 4)
        tensor([[8.]])
    """
    return nm_linear_math(x, values, index, bias, n, m)


def nm_linear_math(x, values, index, bias, n, m):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= 8:
        y = (x2[:, input_columns(index, n, m)] * values.to(x.dtype)).sum(-1)          # [M, out, kept] -> [M, out]
        y = y.reshape(*x.shape[:-1], values.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, unpack_nm(values, index, n, m).to(x.dtype), bias)


@nm_linear.register_fake
def _(x, values, index, bias, n, m):
    torch._check(values.shape == index.shape, lambda: "nm_linear: values and index shapes differ")
    torch._check(values.shape[1] * m == x.shape[-1] * n, lambda: "nm_linear: x and the N:M weight disagree")
    return x.new_empty((*x.shape[:-1], values.shape[0]))



def nm_linear_reference(x, values, index, bias, n, m):
    """The op's semantics as plain torch (what kernels are checked against): the dense weight unpacked, one
    product."""
    y = x @ unpack_nm(values, index, n, m).to(x.dtype).T
    return y if bias is None else y + bias

register_linear_op(torch.ops.sparsefx.nm_linear.default)   # linear-like: found by ir.linear_nodes
