"""Group-wise weight quantization (RTN and GPTQ) and the packed storage format.

A weight ``W: [out, in]`` is cut into groups of ``group_size`` consecutive input columns per row. Each group has
a scale (fp16) and, when asymmetric, an integer zero point; a weight is stored as a ``bits``-bit code ``q`` and
means ``(q - zero) * scale``. Symmetric groups use the fixed zero ``2**(bits-1)``.

Storage (``QuantizedWeight``):
  packed  uint8 [out, in * bits / 8]   codes of each row as a little-endian bit stream (int4: two per byte, low
                                       nibble first; int2: four per byte; int3: eight codes per three bytes)
  scales  fp16  [out, in / group_size]
  zeros   uint8 [out, in / group_size] (asymmetric only)
Bits per weight = ``bits + 16 / group_size (+ 8 / group_size if asymmetric)``; ``QuantizedWeight.nbytes`` counts
exactly what is stored.

GPTQ (Frantar et al. 2022) quantizes columns left to right and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X / n`` of the layer's calibration inputs
(Cholesky form, lazy block updates). Groups take their scale from the weights as updated when the group starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: ``bits`` in {2, 3, 4, 8}, ``group_size`` columns per scale, (a)symmetric."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise RecipeError(f"bits: expected one of {BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise RecipeError(f"group_size: expected one of {GROUP_SIZES}, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric: expected true or false, got {self.symmetric!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the code, its group's fp16 scale and (asymmetric) uint8 zero."""
        return self.bits + (16 + (0 if self.symmetric else 8)) / self.group_size

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        if len(shape) != 2 or shape[1] % self.group_size:
            raise RecipeError(f"{name} {tuple(shape)}: in_features must be a multiple of group_size "
                              f"{self.group_size}; choose a group size that divides it or exclude this linear")


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w: [rows, g]`` (one group per row): ``([rows], [rows])`` float.

    The scale is rounded to fp16 here, so codes are chosen for the scale that is stored.
    """
    w = w.float()
    if spec.symmetric:
        amax = w.abs().amax(1)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        lo, hi = w.amin(1), w.amax(1)
        scale = (hi - lo) / spec.maxq
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of ``w`` under per-row ``scale``/``zero`` (broadcast over trailing columns), as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantizedWeight:
    """A packed group-quantized ``[out, in]`` weight. ``dequantize()`` gives back the float matrix it stands for."""

    packed: torch.Tensor          # uint8 [out, in * bits / 8]
    scales: torch.Tensor          # fp16 [out, in / group]
    zeros: torch.Tensor | None    # uint8 [out, in / group], None if symmetric
    spec: QuantSpec
    shape: tuple[int, int]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec):
        """``codes: [out, in]`` integers in [0, maxq]; ``scales``/``zeros``: ``[out, in / group]``."""
        return cls(pack(codes.to(torch.uint8), spec.bits), scales.half(),
                   None if spec.symmetric else zeros.to(torch.uint8), spec, tuple(codes.shape))

    def codes(self) -> torch.Tensor:
        return unpack(self.packed, self.spec.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_f, in_f = self.shape
        g = self.spec.group_size
        zeros = (torch.full(self.scales.shape, 2 ** (self.spec.bits - 1), dtype=torch.float32)
                 if self.zeros is None else self.zeros.float())
        q = self.codes().float().reshape(out_f, in_f // g, g)
        return ((q - zeros[..., None]) * self.scales.float()[..., None]).reshape(out_f, in_f).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def attrs(self) -> dict:
        return {"bits": self.spec.bits, "group_size": self.spec.group_size, "symmetric": self.spec.symmetric,
                "shape": list(self.shape)}

    @classmethod
    def restore(cls, attrs: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        spec = QuantSpec(int(attrs["bits"]), int(attrs["group_size"]), bool(attrs["symmetric"]))
        shape = tuple(int(s) for s in attrs["shape"])
        qw = cls(tensors["packed"], tensors["scales"], tensors.get("zeros"), spec, shape)
        expect = (shape[0], shape[1] * spec.bits // 8)
        groups = (shape[0], shape[1] // spec.group_size)
        if (tuple(qw.packed.shape) != expect or qw.packed.dtype != torch.uint8 or tuple(qw.scales.shape) != groups
                or (qw.zeros is None) != spec.symmetric or (qw.zeros is not None and tuple(qw.zeros.shape) != groups)):
            raise ValueError(f"packed weight tensors do not fit a {shape} weight at {spec}")
        return qw


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes: [rows, n]`` (uint8, < 2**bits) into a little-endian bit stream per row: ``[rows, n*bits/8]``.

    Example:
        >>> pack(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4)
        tensor([[ 33,  15]], dtype=torch.uint8)
    """
    rows, n = codes.shape
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes[..., None] >> shifts) & 1).reshape(rows, n * bits // 8, 8)      # bit i of byte j
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[rows, n]`` uint8 codes."""
    rows = packed.shape[0]
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1            # [rows, bytes, 8]
    bitsets = stream.reshape(rows, n, bits)
    return (bitsets << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
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
    scale, zero = group_params(groups, spec)
    codes = quantize_codes(groups, scale[:, None], zero[:, None], spec.maxq)
    return QuantizedWeight.from_codes(codes.reshape(out_f, in_f), scale.reshape(out_f, -1), zero.reshape(out_f, -1),
                                      spec)


@torch.no_grad()
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block: int = 128) -> QuantizedWeight:
    """GPTQ with the layer's input Gram matrix ``hessian: [in, in]`` (``X^T X``; any positive scale).

    Columns whose input never fires (zero diagonal) are quantized as zero weights. ``damp`` adds that fraction of
    the mean diagonal to the diagonal (numerical stability).

    Example:
        >>> x = torch.randn(256, 64); w = torch.randn(16, 64)
        >>> qw = quantize_gptq(w, x.T @ x, QuantSpec(3, 32))
    """
    spec.check_shape(tuple(w.shape))
    out_f, in_f = w.shape
    g = spec.group_size
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian must be [{in_f}, {in_f}], got {tuple(hessian.shape)}")
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype)
    # upper Cholesky factor of H^-1: row i holds how column i's error propagates to the columns after it
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, in_f // g)
    zeros = torch.zeros(out_f, in_f // g)
    block = max(g, block // g * g)                      # blocks hold whole groups
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1, Hb = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:                            # new group: its parameters from the weights as updated now
                s, z = group_params(W1[:, i:i + g], spec)
                scales[:, col // g], zeros[:, col // g] = s, z
                s, z = s.double(), z.double()
            q = quantize_codes(W1[:, i], s, z, spec.maxq)
            codes[:, col] = q.float()
            e = (W1[:, i] - (q - z) * s) / Hb[i, i]
            W1[:, i:] -= e[:, None] * Hb[i, i:][None, :]
            err[:, i] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return QuantizedWeight.from_codes(codes, scales, zeros, spec)


__all__ = ["BITS", "GROUP_SIZES", "QuantSpec", "QuantizedWeight", "group_params", "pack", "quantize_gptq",
           "quantize_rtn", "unpack"]
