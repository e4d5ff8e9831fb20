"""The packed storage format of group-quantized weights (what ``sparsefx::quant_linear`` reads).

A weight ``W: [out, in]`` is cut into groups of ``group_size`` consecutive input columns per row. Each group has
a scale (fp16) and, when asymmetric, an integer zero point; a weight is stored as a ``bits``-bit code ``q`` and
means ``(q - zero) * scale``. Symmetric groups use the fixed zero ``2**(bits-1)``.

  packed  uint8 [out, in * bits / 8]   codes of each row as a little-endian bit stream (int4: two per byte, low
                                       nibble first; int2: four per byte; int3: eight codes per three bytes)
  scales  fp16  [out, in / group_size]
  zeros   uint8 [out, in / group_size] (asymmetric only)

Bits per weight = ``bits + 16 / group_size (+ 8 / group_size if asymmetric)``; ``QuantizedWeight.nbytes`` counts
exactly what is stored. The algorithms that choose the codes (RTN, GPTQ) are in ``passes/quant.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import RecipeError

BITS = (2, 3, 4, 8)
# The usual group sizes, and 96 / 192 / 576 for widths that 128 does not divide (SmolLM2's hidden size is 576):
# a larger group spends fewer bits on scales and zeros, which a low-rank correction can use instead.
GROUP_SIZES = (32, 64, 96, 128, 192, 256, 576)


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: ``bits`` in {2, 3, 4, 8}, ``group_size`` (one of ``GROUP_SIZES``) columns per
    scale, (a)symmetric."""

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
        return dequantize_packed(self.packed, self.scales, self.zeros, self.spec.bits, self.spec.group_size, dtype)

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
    if bits in (2, 4, 8):       # whole codes per byte: one shift per code position
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> shifts) & (2 ** bits - 1)).reshape(rows, -1)[:, :n]
    if bits == 3 and n % 8 == 0:  # eight codes per three bytes: one 24-bit word each
        b = packed.reshape(rows, -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        return ((word[..., None] >> shifts) & 7).to(torch.uint8).reshape(rows, n)
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1            # [rows, bytes, 8]
    bitsets = stream.reshape(rows, n, bits)
    return (bitsets << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``[out, in]`` matrix that packed codes, scales and zeros (None: symmetric) stand for."""
    out_f = packed.shape[0]
    in_f = packed.shape[1] * 8 // bits
    q = unpack(packed, bits, in_f).float().reshape(out_f, in_f // group_size, group_size)
    z = (torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.float32, device=packed.device)
         if zeros is None else zeros.float())
    return ((q - z[..., None]) * scales.float()[..., None]).reshape(out_f, in_f).to(dtype)


__all__ = ["BITS", "GROUP_SIZES", "QuantSpec", "QuantizedWeight", "dequantize_packed", "pack", "unpack"]
