"""Named views of the quantized ops' node arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ArgsView

# The stored tensors of ``lowrank_quant_linear`` (packed .. b_zeros), by the names its eager module and artifacts
# keep them under.
BUFFERS = ("lq_packed", "lq_scales", "lq_zeros", "lq_at", "lq_at_scales", "lq_at_zeros", "lq_d", "lq_b",
           "lq_b_scales", "lq_b_zeros")


@dataclass
class QuantArgs(ArgsView):
    op_name = "quant_linear"
    x: Any
    packed: Any
    scales: Any
    zeros: Any
    bias: Any
    bits: int
    group_size: int


@dataclass
class LowRankQuantArgs(ArgsView):
    op_name = "lowrank_quant_linear"
    x: Any
    packed: Any
    scales: Any
    zeros: Any
    at_packed: Any
    at_scales: Any
    at_zeros: Any
    d: Any
    b_packed: Any
    b_scales: Any
    b_zeros: Any
    bias: Any
    bits: int
    group_size: int
    factor_bits: int
    factor_group: int

    STORED = ("packed", "scales", "zeros", "at_packed", "at_scales", "at_zeros", "d", "b_packed", "b_scales", "b_zeros")

    def stored(self) -> dict:
        """``{buffer name (BUFFERS): argument}`` for the stored tensors."""
        return {key: getattr(self, arg) for key, arg in zip(BUFFERS, self.STORED)}


__all__ = ["BUFFERS", "LowRankQuantArgs", "QuantArgs"]
