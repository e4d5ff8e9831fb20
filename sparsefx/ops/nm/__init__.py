"""The N:M op ``nm_linear`` (a weight with N of every M kept, stored as values + uint8 in-group index).

    op.py       schema, fake, default math (its reference: a gather per kept weight for decode, unpack + GEMM else)
    format.py   the compressed N:M layout
    args.py     the named view of the node's arguments
    eager.py    the eager module and the lowering of a node to it
    triton.py   the Triton kernel (``_nm_jit.py``)
"""

from __future__ import annotations

import torch

from ..spec import OpSpec, register, triton_kernel
from . import eager, op
from .args import NMArgs
from .format import pack_nm


def _example(g, rows):
    w = torch.randn(13, 9, 4, generator=g)
    w[torch.arange(4).expand(13, 9, 4) >= 2] = 0          # keep 2 of every 4 (then shuffle each group)
    w = torch.gather(w, 2, torch.rand(13, 9, 4, generator=g).argsort(-1)).reshape(13, 36)
    values, index = pack_nm(w, 2, 4)
    return torch.randn(rows, 36, generator=g), values, index, torch.randn(13, generator=g), 2, 4


register(OpSpec(name="nm_linear", family="nm", args=NMArgs, reference=op.nm_linear_reference, eager=eager.NMLinear,
                to_eager=eager.nm_to_eager, kernels={"triton": triton_kernel(__name__, "nm_linear")},
                no_kernel={"cpu": "no C++ kernel: the default math already reads only the kept weights for decode "
                                  "(a gather of x per kept weight), and unpacks to one MKL GEMM for prefill"},
                example=_example))
