"""The N:M sparse storage format: a weight ``W: [out, in]`` with at most ``n`` non-zeros in every group of ``m``
consecutive inputs of a row (what the ``magnitude``/``wanda`` passes with ``pattern: "n:m"`` produce) stored as

    values  [out, in * n / m]         the kept weights of each group, in input order (zeros pad groups with fewer)
    index   uint8 [out, in * n / m]   each kept weight's position inside its group (0 .. m-1)

A 2:4 weight takes half its values' bytes plus one byte per kept weight (fp32: 2.5 bytes per weight instead of
4; bf16: 1.5 instead of 2). ``sparsefx::nm_linear`` multiplies it; the Triton kernel (``ops/nm/triton.py``)
reads this layout directly.
"""

from __future__ import annotations

import torch


def pack_nm(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W: [out, in]`` with at most ``n`` non-zeros per group of ``m`` -> ``(values, index)``.

    Example:
        >>> v, i = pack_nm(torch.tensor([[0., 2., 0., 3.]]), 2, 4)
        >>> v.tolist(), i.tolist()
        ([[2.0, 3.0]], [[1, 3]])
    """
    out_f, in_f = w.shape
    if not 0 < n < m or in_f % m:
        raise ValueError(f"pack_nm: need 0 < n < m and in_features ({in_f}) a multiple of m ({m})")
    groups = w.reshape(out_f, in_f // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(-1).max()) > n:
        raise ValueError(f"pack_nm: the weight has more than {n} non-zeros in some group of {m}; apply an {n}:{m} "
                         "mask first (e.g. `method: wanda, pattern: '2:4'`)")
    # kept positions first (stable, so in input order), padded with zero-valued positions
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :n]        # [out, G, n]
    values = torch.gather(groups, -1, order)
    return values.reshape(out_f, -1).contiguous(), order.to(torch.uint8).reshape(out_f, -1).contiguous()


def unpack_nm(values: torch.Tensor, index: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a packed N:M layout."""
    out_f = values.shape[0]
    groups = values.shape[1] // n
    dense = torch.zeros(out_f, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, index.reshape(out_f, groups, n).long(), values.reshape(out_f, groups, n))
    return dense.reshape(out_f, groups * m)


def input_columns(index: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The input channel each kept weight multiplies: ``(j // n) * m + index[:, j]`` (int64, ``index``'s shape).

    Example:
        >>> input_columns(torch.tensor([[1, 3, 0, 2]], dtype=torch.uint8), 2, 4).tolist()
        [[1, 3, 4, 6]]
    """
    j = torch.arange(index.shape[1], device=index.device)
    return (j // n * m) + index.long()


__all__ = ["input_columns", "pack_nm", "unpack_nm"]
