"""The quantized ops: ``quant_linear`` (RTN / GPTQ) and ``lowrank_quant_linear`` (DAM: ``W ≈ Q + A diag(d) B``).

    op.py       schemas, fakes, default math, the torch references
    format.py   the packed group-quantized format (2/3/4/8-bit codes, fp16 scales, uint8 zero points)
    args.py     named views of the nodes' arguments (and DAM's stored tensor names)
    eager.py    the eager modules and the lowering of each node to one
    cpu.py      the CPU kernels (C++ in ``quant.cpp``; int8-activation twins) and the decode preparation
    triton.py   the Triton kernel (dequant-matmul with DAM's fused low-rank epilogue; ``_quant_jit.py``)
"""

from __future__ import annotations

import torch

from ..spec import OpSpec, cpu_kernel_setup, register, triton_kernel
from . import cpu, eager, op
from .format import QuantizedWeight, QuantSpec
from .args import LowRankQuantArgs, QuantArgs


def _cpu(cpp, name: str):
    def load(int8_activations: bool):
        return cpp(int8_activations), f"cpu.{name}_q8" if int8_activations else f"cpu.{name}"

    return load


def _packed(g, out, inp, spec: QuantSpec):
    """Random codes, scales and zero points of an ``[out, inp]`` weight in the packed format."""
    groups = inp // spec.group_size
    codes = torch.randint(0, spec.maxq + 1, (out, inp), generator=g)
    scales = torch.rand(out, groups, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, spec.maxq + 1, (out, groups), generator=g)
    qw = QuantizedWeight.from_codes(codes, scales, zeros, spec)
    return qw.packed, qw.scales, qw.zeros


def _quant_example(g, rows):
    return (torch.randn(rows, 96, generator=g), *_packed(g, 45, 96, QuantSpec(3, 32)), torch.randn(45, generator=g),
            3, 32)


def _lowrank_example(g, rows):
    r = 5
    main = _packed(g, 64, 96, QuantSpec(4, 32))
    at = _packed(g, r, 64, QuantSpec(4, 32))            # Aᵀ: [r, out], groups along out
    b = _packed(g, r, 96, QuantSpec(4, 32))             # B: [r, in]
    return (torch.randn(rows, 96, generator=g), *main, *at, torch.rand(r, generator=g), *b,
            torch.randn(64, generator=g), 4, 32, 4, 32)


for _name, _args, _eager, _lower, _ref, _cpp, _kernel, _prepare, _example in (
        ("quant_linear", QuantArgs, eager.QuantLinear, eager.quant_to_eager, op.quant_linear_reference,
         cpu.cpp_quant_linear, cpu.quant_linear_cpu, cpu.prepare_quant, _quant_example),
        ("lowrank_quant_linear", LowRankQuantArgs, eager.LowRankQuantLinear, eager.lowrank_quant_to_eager,
         op.lowrank_quant_linear_reference, cpu.cpp_lowrank_quant_linear, cpu.lowrank_quant_linear_cpu,
         cpu.prepare_lowrank_quant, _lowrank_example)):
    register(OpSpec(name=_name, family="quant", args=_args, reference=_ref, eager=_eager, to_eager=_lower,
                    kernels={"cpu": _cpu(_cpp, _name), "triton": triton_kernel(__name__, _name)}, prepare_cpu=_prepare,
                    setup={"cpu": cpu_kernel_setup(getattr(op, _name), _kernel)}, example=_example))
