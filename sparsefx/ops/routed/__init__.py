"""The routed ops (DAWS three-tier routing, TEAL as its one-tier case): ``tiered_linear``, ``multitier_linear``,
``banded_linear``.

    op.py       schemas, fakes, default math, the one torch reference (``tier_reference``)
    format.py   the banded layout (every tier in one fp16 matrix, each weight's band in its low mantissa bits)
    args.py     named views of the nodes' arguments
    eager.py    the eager modules and the lowering of each node to one
    cpu.py      the CPU kernels (C++ in ``routed.cpp``) and the decode preparation
    triton.py   the Triton kernels (``_*_jit.py``: their JIT sources)
"""

from __future__ import annotations

import torch

from ..layout import transposed_storage
from ..spec import OpSpec, cpu_kernel_setup, register, triton_kernel
from . import cpu, eager, op
from .args import BandedArgs, MultitierArgs, TieredArgs
from .format import pack_bands


def _cpu(cpp, name: str):
    def load(int8_activations: bool):
        return cpp(), f"cpu.{name}"

    return load


def _weight(g, out, inp, dtype=torch.float32):
    return transposed_storage(torch.randn(out, inp, generator=g).to(dtype))      # what prepare_cpu_decode stores


def _x(g, rows, inp):
    return torch.randn(rows, inp, generator=g)


def _tiered_example(g, rows):
    w = _weight(g, 23, 37)
    wm = transposed_storage((w * (torch.rand(w.shape, generator=g) > 0.5)).half())
    return _x(g, rows, 37), w, wm, torch.randn(23, generator=g), 0.9, 0.3


def _multitier_example(g, rows):
    w = _weight(g, 23, 37)
    mediums = [transposed_storage(w * (w.abs() > c)) for c in (0.4, 0.9)]
    return _x(g, rows, 37), w, mediums, torch.randn(23, generator=g), [1.2, 0.6, 0.2]


def _banded_example(g, rows):
    banded = transposed_storage(pack_bands(torch.randn(23, 37, generator=g), [0.4, 0.9]))
    return _x(g, rows, 37), banded, torch.randn(23, generator=g), [1.2, 0.6, 0.2]


for _name, _args, _eager, _lower, _ref, _cpp, _kernel, _prepare, _example in (
        ("tiered_linear", TieredArgs, eager.TieredLinear, eager.tiered_to_eager, op.tiered_linear_reference,
         cpu.cpp_tiered_linear, cpu.tiered_linear_cpu, cpu.prepare_tiered, _tiered_example),
        ("multitier_linear", MultitierArgs, eager.MultiTierLinear, eager.multitier_to_eager,
         op.multitier_linear_reference, cpu.cpp_multitier_linear, cpu.multitier_linear_cpu, cpu.prepare_multitier,
         _multitier_example),
        ("banded_linear", BandedArgs, eager.BandedLinear, eager.banded_to_eager, op.banded_linear_reference,
         cpu.cpp_banded_linear, cpu.banded_linear_cpu, cpu.prepare_banded, _banded_example)):
    register(OpSpec(name=_name, family="routed", args=_args, reference=_ref, eager=_eager, to_eager=_lower,
                    kernels={"cpu": _cpu(_cpp, _name), "triton": triton_kernel(__name__, _name)}, prepare_cpu=_prepare,
                    setup={"cpu": cpu_kernel_setup(getattr(op, _name), _kernel)}, example=_example))
