"""N:M sparse matmul (2:4, 4:8) over a compressed layout, as a Triton kernel.

The weight is in the layout of ``ops/nm/format.py`` (values + uint8 in-group indices), so a 2:4 weight is read at half
its bytes plus a byte per kept weight (a production layout would pack the indices into 2 bits; uint8 keeps the
kernel readable). The kernel gathers ``x`` at ``group * m + index`` — the inputs are
the small operand in decode, so the gather hits cache while the weights stream.

``nm_matmul_reference`` is the torch reference, ``sparsefx::triton_nm_linear`` the op (what the backend lowers
``sparsefx::nm_linear`` to on CUDA).
"""

from __future__ import annotations

import torch

from ..triton_support import check_device, k_chunks, output_buffer, splits_for
from ..tuning import lookup
from .format import pack_nm, unpack_nm


def _kernel():
    from . import _nm_jit   # lazy: the JIT module imports triton

    return _nm_jit.nm_mm


def nm_matmul_reference(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ unpack(values, index).T (+ bias)`` in fp32."""
    y = x.float() @ unpack_nm(values, index, n, m).float().T
    return y if bias is None else y + bias.float()


def configs() -> list[dict]:
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_J": bj, "SPLIT_K": sk, "num_warps": w}
            for bm in (1, 4, 16) for bn in (32, 64, 128) for bj in (32, 64) for sk in (1, 8) for w in (4, 8)]


def default_config(rows: int, kept: int = 0, out_f: int = 0) -> dict:
    """Heuristic without an autotune entry: the kept-weight loop split until a large GPU has enough programs
    (``TARGET_PROGRAMS``) when the row and output blocks alone are too few (decode)."""
    block_m = 1 if rows == 1 else 4
    blocks = -(-rows // block_m) * -(-out_f // 64) if out_f else 0
    split = splits_for(blocks, kept, 64) if blocks else 1
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_J": 64, "SPLIT_K": split, "num_warps": 4}


def nm_matmul(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None, config: dict | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [M, in]`` times the N:M weight -> fp32 ``[M, out]``.

    Example:
        >>> nm_matmul(x, *pack_nm(w, 2, 4), 2, 4)  # doctest: +SKIP
    """
    check_device(x, values)
    if x.dim() != 2 or values.shape != index.shape or x.shape[1] * n != values.shape[1] * m:
        raise ValueError(f"nm_matmul: x {tuple(x.shape)} does not fit an {n}:{m} weight stored as "
                         f"{tuple(values.shape)} values and {tuple(index.shape)} indices")

    rows, k = x.shape
    out_f, kept = values.shape
    cfg = (config or lookup("nm_matmul", x.device, (rows, k, out_f, n, m))
           or default_config(rows, kept, out_f))
    j_chunk, split = k_chunks(kept, cfg["BLOCK_J"], cfg.get("SPLIT_K", 1))   # split the kept-weight loop
    y = output_buffer(out, (rows, out_f), x.device, zero=split > 1)
    x = x.contiguous()
    grid = (-(-rows // cfg["BLOCK_M"]), -(-out_f // cfg["BLOCK_N"]), split)
    _kernel()[grid](x, values.contiguous(), index.contiguous(), y, y if bias is None else bias.contiguous(),
                    rows, out_f, kept, k, j_chunk, N_KEEP=n, M_GROUP=m, HAS_BIAS=bias is not None, ATOMIC=split > 1,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"],
                    num_warps=cfg["num_warps"])
    return y


@torch.library.custom_op("sparsefx::triton_nm_linear", mutates_args=())
def triton_nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
                     n: int, m: int) -> torch.Tensor:
    """Linear with an N:M weight in the packed layout, through the Triton kernel: ``x: [..., in] -> [..., out]``."""
    y = nm_matmul(x.reshape(-1, x.shape[-1]), values, index, n, m, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], values.shape[0])


@triton_nm_linear.register_fake
def _(x, values, index, bias, n, m):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


__all__ = ["configs", "default_config", "nm_matmul", "nm_matmul_reference", "pack_nm", "triton_nm_linear",
           "unpack_nm"]
