"""CATS's op ``threshold`` (zero the activations with ``|x| < t``): ``op.py`` (schema, fake; its math is its
reference), ``args.py``, ``eager.py``. Not linear-like; one elementwise ``where``, which Inductor fuses — no kernel
of its own."""

from __future__ import annotations

import torch

from ..spec import OpSpec, register
from . import eager, op
from .args import ThresholdArgs

def _example(g, rows):
    return torch.randn(rows, 17, generator=g), 0.4


register(OpSpec(name="threshold", family="threshold", args=ThresholdArgs, reference=op.threshold_reference,
                eager=eager.ThresholdedAct, to_eager=eager.threshold_to_eager,
                no_kernel={"cpu": "one elementwise where: the op's torch math (Inductor fuses it when compiled)",
                           "triton": "one elementwise where: the op's torch math (Inductor fuses it when compiled)"},
                example=_example))
