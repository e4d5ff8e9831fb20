"""The compressed ops, one folder per family; importing this package registers every op with torch.library and
its ``OpSpec`` in ``REGISTRY`` (see ``spec.py``).

    routed/      tiered_linear, multitier_linear, banded_linear   (DAWS, TEAL)
    quant/       quant_linear, lowrank_quant_linear               (RTN, GPTQ, DAM)
    nm/          nm_linear                                        (N:M sparse weights)
    rsparse/     sparse_lowrank_linear                            (R-Sparse baseline)
    threshold/   threshold                                        (CATS baseline)

Shared: ``spec.py`` (the registry, argument views), ``build.py`` (building the C++ kernels), ``layout.py`` (the
transposed storage the CPU decode kernels read), ``tuning.py`` (the autotune cache the launchers read),
``triton_support.py`` and ``_tile_jit.py`` (what the Triton kernels share).

Adding an op: a new folder with ``op.py`` (``torch.library.custom_op`` + fake + reference), ``args.py`` (an
``ArgsView`` dataclass whose fields are the schema's arguments), ``eager.py`` (the module and its ``to_eager``),
kernels or a reason per backend, and an ``__init__.py`` that ``register``s its ``OpSpec`` with an ``example``;
import the folder below. ``tests/ops/test_registry.py`` then checks it against the reference on random inputs.
"""

from __future__ import annotations

from . import nm, quant, routed, rsparse, threshold  # noqa: F401  (each registers its ops)
from .spec import REGISTRY, ArgsView, OpSpec, call_directly, eager_kinds, register, spec_for_target

__all__ = ["REGISTRY", "ArgsView", "OpSpec", "call_directly", "eager_kinds", "register", "spec_for_target"]
