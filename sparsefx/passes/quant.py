"""Choosing quantization codes: group-wise round-to-nearest (RTN) and GPTQ.

The storage format (``QuantSpec``, ``QuantizedWeight``, packing) is in ``ops/quant/format.py``.

GPTQ (Frantar et al. 2022) quantizes columns left to right and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X / n`` of the layer's calibration inputs
(Cholesky form, lazy block updates). Groups take their scale from the weights as updated when the group starts.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import CalibrationError
from ..ops.quant.format import QuantizedWeight, QuantSpec

SCALE_RULES = ("absmax", "signed_max")


def group_params(w: torch.Tensor, spec: QuantSpec, rule: str = "absmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w: [rows, g]`` (one group per row): ``([rows], [rows])`` float.

    Symmetric groups (zero fixed at ``2**(bits-1)``) take their scale by ``rule``: ``absmax`` (GPTQ's reference
    code) spreads ``[-max|w|, max|w|]`` over the ``2**bits - 1`` steps; ``signed_max`` (llama.cpp's Q4_0) maps the
    weight of largest magnitude exactly onto the lowest code, ``scale = w_max / -2**(bits-1)`` (negative when that
    weight is positive): a step of ``max|w| / 2**(bits-1)``, finer than absmax's, the other end clamped one step short.
    The scale is rounded to fp16 here, so codes are chosen for the scale that is stored.
    """
    w = w.float()
    if spec.symmetric:
        if rule == "signed_max":
            peak = w.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1)
            scale = peak / -float(2 ** (spec.bits - 1))
        else:
            scale = 2 * w.abs().amax(1) / spec.maxq
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        lo, hi = w.amin(1), w.amax(1)
        scale = (hi - lo) / spec.maxq
        zero = None
    scale = torch.where(scale != 0, scale, torch.ones_like(scale)).half().float()
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of ``w`` under per-row ``scale``/``zero`` (broadcast over trailing columns), as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, rule: str = "absmax") -> QuantizedWeight:
    """Round each group to its nearest codes (round-to-nearest).

    Example:
        >>> qw = quantize_rtn(torch.randn(8, 64), QuantSpec(4, 32))
        >>> qw.dequantize().shape
        torch.Size([8, 64])
    """
    spec.check_shape(tuple(w.shape))
    out_f, in_f = w.shape
    g = spec.group_size
    groups = w.float().reshape(out_f * (in_f // g), g)
    scale, zero = group_params(groups, spec, rule)
    codes = quantize_codes(groups, scale[:, None], zero[:, None], spec.maxq)
    return QuantizedWeight.from_codes(codes.reshape(out_f, in_f), scale.reshape(out_f, -1), zero.reshape(out_f, -1),
                                      spec)


@contextlib.contextmanager
def one_thread():
    """Run a loop of many tiny tensor ops on one intra-op thread: with more, every op pays a thread hand-off (and
    spins when another process holds the cores) — measured 27x slower for GPTQ's column loop on this 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block: int = 128, consume: bool = False, dtype: torch.dtype = torch.float64,
                  rule: str = "absmax") -> QuantizedWeight:
    """GPTQ with the layer's input Gram matrix ``hessian: [in, in]`` (``X^T X``; any positive scale).

    Columns whose input never fires (zero diagonal) are quantized as zero weights. ``damp`` adds that fraction of
    the mean diagonal to the diagonal (numerical stability). ``consume``: the caller gives up an fp64 ``hessian``,
    which is then damped and factored in place of a copy (for an 11008-wide input each copy is ~1 GB; with
    ``consume`` only that one matrix lives, else it and its copy). ``dtype``: what the factorization and the
    column loop compute in — float64 (default), or float32 as GPTQ's reference code does: half the memory and
    about twice as fast, for 7B-class layers. ``rule``: how symmetric groups take their scale (``group_params``).

    Example:
        >>> x = torch.randn(256, 64); w = torch.randn(16, 64)
        >>> qw = quantize_gptq(w, x.T @ x, QuantSpec(3, 32))
    """
    spec.check_shape(tuple(w.shape))
    out_f, in_f = w.shape
    g = spec.group_size
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian must be [{in_f}, {in_f}], got {tuple(hessian.shape)}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    W = w.to(dtype, copy=True)
    H = hessian if consume and hessian.dtype == dtype else hessian.to(dtype, copy=True)
    del hessian
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    try:
        Hinv = _inverse_cholesky_in_place(H)
    except torch.linalg.LinAlgError as e:
        raise CalibrationError(f"GPTQ: the damped Hessian of a {in_f}-input linear is not positive definite in "
                               f"{str(dtype).removeprefix('torch.')} ({e}); raise gptq.damp (now {damp})"
                               f"{' or use precision: float64' if dtype == torch.float32 else ''}") from None
    del H
    codes = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, in_f // g)
    zeros = torch.zeros(out_f, in_f // g)
    block = max(g, block // g * g)                      # blocks hold whole groups
    _gptq_columns(W, Hinv, spec, block, codes, scales, zeros, rule)
    return QuantizedWeight.from_codes(codes, scales, zeros, spec)


def _inverse_cholesky_in_place(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` (row i: how column i's error propagates to the columns after it),
    computed in ``H``'s own memory: no second ``[in, in]`` matrix (for an 11008-wide input, 1 GB less at the peak).

    LAPACK factors in place on column-major data; ``H.mT`` is that layout of the same memory, so the three steps
    (Cholesky, inverse from the factor, Cholesky of the inverse) run as ``out=`` calls on it. ``H`` is first made
    exactly symmetric from its lower triangle — the triangle a plain ``torch.linalg.cholesky(H)`` reads — so the
    result is bit for bit the one of the three out-of-place calls. Returns a view of ``H``'s memory."""
    n, chunk = H.shape[0], 1024
    for r0 in range(0, n, chunk):                     # mirror the lower triangle onto the upper, a band at a time
        r1 = min(r0 + chunk, n)
        H[r0:r1, r1:].copy_(H[r1:, r0:r1].mT)
        d = H[r0:r1, r0:r1]
        d.copy_(d.tril() + d.tril(-1).mT)
    A = H.mT
    torch.linalg.cholesky(A, out=A)
    torch.cholesky_inverse(A, out=A)
    torch.linalg.cholesky(A, upper=True, out=A)
    return A


def _gptq_columns(W, Hinv, spec, block, codes, scales, zeros, rule: str = "absmax") -> None:
    """GPTQ's column loop (in place on ``W``; fills ``codes``, ``scales``, ``zeros``).

    Each block of columns is worked on transposed (``[cols, out]``), so a column is one contiguous row and the
    rank-1 update of the columns after it streams contiguous memory: the same operations on the same numbers as
    the ``[out, cols]`` loop (bit-identical codes), 2.1x faster on a 4096-row layer on this machine. The loop of
    tiny ops runs on one thread (``one_thread``); the lazy update of the remaining columns, one GEMM per block,
    uses every thread once it is large (for a 7B down projection it was 28 % of a block's time on one)."""
    in_f, g = W.shape[1], spec.group_size
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1, Hb = W[:, b0:b1].T.contiguous(), Hinv[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        with one_thread():
            for i in range(b1 - b0):
                col = b0 + i
                if col % g == 0:                        # new group: its parameters from the weights as updated now
                    s, z = group_params(W1[i:i + g].T, spec, rule)
                    scales[:, col // g], zeros[:, col // g] = s, z
                    s, z = s.to(W.dtype), z.to(W.dtype)
                w = W1[i]
                q = quantize_codes(w, s, z, spec.maxq)
                codes[:, col] = q.float()
                e = (w - (q - z) * s) / Hb[i, i]
                W1[i:] -= Hb[i, i:, None] * e[None, :]
                err[i] = e
        if b1 < in_f:
            if W.shape[0] * (in_f - b1) >= _THREADED_UPDATE:
                W[:, b1:] -= err.T @ Hinv[b0:b1, b1:]
            else:
                with one_thread():
                    W[:, b1:] -= err.T @ Hinv[b0:b1, b1:]


_THREADED_UPDATE = 1 << 20       # elements of the lazy update from which the GEMM runs on every thread


__all__ = ["SCALE_RULES", "group_params", "one_thread", "quantize_codes", "quantize_gptq", "quantize_rtn"]
