"""R-Sparse's op ``sparse_lowrank_linear`` (large activations through the full weight, the rest through rank-r
factors): ``op.py`` (schema, fake, reference), ``args.py``, ``eager.py``. A baseline: no kernels of its own."""

from __future__ import annotations

import torch

from ..spec import OpSpec, register
from . import eager, op
from .args import SparseLowRankArgs

def _example(g, rows):
    return (torch.randn(rows, 29, generator=g), torch.randn(13, 29, generator=g), torch.randn(13, 3, generator=g),
            torch.randn(3, 29, generator=g), torch.randn(13, generator=g), 0.5)


register(OpSpec(name="sparse_lowrank_linear", family="rsparse", args=SparseLowRankArgs,
                reference=op.sparse_lowrank_linear_reference, eager=eager.SparseLowRankLinear,
                to_eager=eager.sparse_lowrank_to_eager,
                no_kernel={"cpu": "a baseline we compare against: its default math (two masked GEMMs) is what runs",
                           "triton": "a baseline we compare against: its default math (two masked GEMMs) is what runs"},
                example=_example))
