"""CPU kernels for the compressed ops, and the step that prepares a compressed model to use them.

``prepare_cpu_decode(model)`` re-stores each ``TieredLinear``'s weights transposed (``W.T`` row-contiguous, the
same tensor viewed as ``[out, in]``, so no memory is added and prefill GEMMs still read it) and registers the CPU
kernel of ``sparsefx::tiered_linear``: single-token calls then read only the kept rows (``ops/routed/cpu.py``). A
``MultiTierLinear`` (several medium tiers) is re-stored and served the same way (``multitier_gemv``), and a
``BandedLinear`` (every tier in one banded fp16 matrix) has that matrix re-stored transposed (``banded_gemv``). Eager
``TieredLinear`` modules call the C++ kernel directly for one token, skipping the op dispatcher. It also registers
the CPU kernels of ``sparsefx::quant_linear`` and ``lowrank_quant_linear`` (``ops/quant/cpu.py``): up to ``MAX_ROWS``
tokens, they multiply straight from the packed codes instead of dequantizing the whole weight per call; prepared
quantized modules call those ops' C++-registered twins directly.

Linears left dense (the LM head above all: 49152 x 576 in SmolLM2, a quarter of the dense model's bytes and most of
a 3-bit model's) are re-stored transposed too, tied embeddings with them. The op stays ``F.linear``, but MKL's
one-token product over a contiguous ``[in, out]`` streams the weight at close to the read bandwidth, where over
``[out, in]`` rows it reaches about half of it (``bench/decode_e2e.py``, ``dense-prepared``). Prefill GEMMs read
either layout at the same speed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..ops import REGISTRY
from ..ops.layout import rows_are_channels, transposed_storage


@functools.cache
def enable_cpu_kernels() -> None:
    """Register the CPU kernels of every op of the registry that has one (``OpSpec.setup["cpu"]``; once, later calls
    do nothing). Each falls back to the op's default implementation where it does not apply."""
    for spec in REGISTRY.values():
        if "cpu" in spec.setup:
            spec.setup["cpu"]()


def _restore_dense_linears(model: nn.Module) -> int:
    """Re-store every plain ``nn.Linear`` weight transposed (see the module docstring); a parameter shared with other
    modules (tied input embeddings) is replaced in all of them, so the tie and the memory stay as they were. Return
    how many weights were re-stored."""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2 and min(w.shape) > 1 \
                and not rows_are_channels(w):
            fresh.setdefault(id(w), nn.Parameter(transposed_storage(w.data), requires_grad=w.requires_grad))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in fresh:
                setattr(module, name, fresh[id(p)])
    return len(fresh)


@torch.no_grad()
def prepare_cpu_decode(model: nn.Module, pack_medium: bool = False, dense_linears: bool = True,
                       int8_activations: bool = False) -> int:
    """Re-store compressed linears for the CPU decode kernel; return how many were prepared.

    Each compressed module is prepared by its op's ``OpSpec.prepare_cpu`` (``sparsefx/ops/<family>/cpu.py``).
    With ``pack_medium``, a DAWS medium tier whose weights are pruned (density <= ``PACK_MAX_DENSITY`` of
    ``ops/routed/cpu.py``) also gets a bitmask-packed copy that one-token calls read instead of its dense rows (the
    dense tensor stays for prefill). Off by default: on this AVX2 CPU the expansion costs more than the bytes it
    saves — packed rows measured slower than dense fp16 rows (``daws.medium_dtype: float16``) at every shape of
    ``bench/kernel_daws_gemv.py``.
    With ``dense_linears`` (the default), plain ``nn.Linear`` weights are re-stored transposed as well (not counted
    in the return value). Outputs equal the unprepared model's up to fp32 summation order.
    With ``int8_activations``, quantized linears (``QuantLinear``: RTN, GPTQ; ``LowRankQuantLinear``: DAM) decode
    with their input rounded to int8 per 32 channels (``quant_matmul_q8``, ``lowrank_quant_matmul_q8``):
    faster, and no longer equal to prefill's outputs — check the model with
    ``sparsefx eval --decode-path --int8-activations``.

    Example:
        >>> prepare_cpu_decode(compressed_model)  # doctest: +SKIP
        210
    """
    enable_cpu_kernels()
    prepare = {spec.eager: spec.prepare_cpu for spec in REGISTRY.values() if spec.prepare_cpu is not None}
    count = 0
    for module in model.modules():
        fn = prepare.get(type(module))
        if fn is not None:
            fn(module, pack_medium=pack_medium, int8_activations=int8_activations)
            count += 1
    if dense_linears:
        _restore_dense_linears(model)
    return count


__all__ = ["enable_cpu_kernels", "prepare_cpu_decode"]
