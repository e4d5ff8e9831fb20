"""The op registry: one ``OpSpec`` per compressed op, which every consumer loops over.

An op family is one folder (``ops/routed``, ``ops/quant``, ``ops/nm``, ``ops/rsparse``, ``ops/threshold``) holding
the op's schema and fake and its one torch reference (``op.py``), its storage format (``format.py``), a named view of
its arguments (``args.py``), the eager module that calls it (``eager.py``), and its kernels (``cpu.py`` with the C++
beside it, ``triton.py``). The family's ``__init__`` registers an ``OpSpec`` naming all of them; lowering to eager
modules (``codegen.eager``), the ``torch.compile`` backend (``codegen.backend``) and ``prepare_cpu_decode``
(``codegen.cpu``) read the registry — none keeps a table of ops of its own.

A change to one op's kernel touches its family folder only.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# backend name -> (int8_activations) -> (the op to retarget a node to or None where it cannot run here, counter label)
KernelLoader = Callable[[bool], tuple[Any, str]]


@dataclass
class ArgsView:
    """Named arguments of one compressed op's node, in the op's schema order (a dataclass per op; its field names are
    the schema's argument names — the registry test checks they agree).

    Example:
        >>> a = TieredArgs.from_node(node)  # doctest: +SKIP
        >>> a.t_high, a.weight_medium  # doctest: +SKIP
        >>> a.update(node, t_high=0.7, t_low=0.2)  # doctest: +SKIP
    """

    op_name: ClassVar[str]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> "ArgsView":
        """The view of ``node`` (a call of this op): positional and keyword arguments by name; an optional argument
        the node leaves out is None."""
        names = cls.names()
        if len(node.args) > len(names):
            raise ValueError(f"{node.name}: {len(node.args)} arguments, {cls.op_name} takes {len(names)}")
        values = dict(zip(names, node.args))
        for k, v in node.kwargs.items():
            if k not in names:
                raise ValueError(f"{node.name}: {cls.op_name} has no argument {k!r} (it takes {names})")
            values[k] = v
        return cls(**{n: values.get(n) for n in names})

    def update(self, node: torch.fx.Node, **changes) -> "ArgsView":
        """Set the named arguments of ``node`` (and of this view); return the view."""
        names = self.names()
        for k, v in changes.items():
            if k not in names:
                raise ValueError(f"{self.op_name} has no argument {k!r} (it takes {names})")
            setattr(self, k, v)
            i = names.index(k)
            if k in node.kwargs or i >= len(node.args):
                node.update_kwarg(k, v)
            else:
                node.update_arg(i, v)
        return self

    def as_args(self) -> tuple:
        """The arguments in schema order (what ``graph.call_function(op, view.as_args())`` takes)."""
        return tuple(getattr(self, n) for n in self.names())


@dataclass(frozen=True)
class OpSpec:
    """What sparsefx knows about one compressed op ``torch.ops.sparsefx.<name>``.

    ``kernels`` maps a backend (``"cpu"``, ``"triton"``) to a loader ``(int8_activations) -> (target, label)``: the op
    overload the backend retargets the op's nodes to (None where it cannot run here) and the counter it bumps;
    ``no_kernel`` says, per backend, why an op has none (the registry test requires a kernel or a reason).
    ``to_eager(gm, node, model)`` returns ``(HF module name, eager module)`` for a node of the op;
    ``prepare_cpu(module, pack_medium=..., int8_activations=...)`` re-stores an eager module for the CPU decode
    kernels (None: nothing to do). ``example(generator, rows)`` builds random arguments with ``rows`` input rows (odd
    shapes; weights in the storage the decode kernels read), which the registry test runs through the op, its
    fake, its kernels and its reference.
    """

    name: str
    family: str
    args: type[ArgsView]
    reference: Callable
    eager: type[nn.Module]
    to_eager: Callable
    kernels: Mapping[str, KernelLoader] = field(default_factory=dict)
    no_kernel: Mapping[str, str] = field(default_factory=dict)
    prepare_cpu: Callable | None = None
    setup: Mapping[str, Callable[[], None]] = field(default_factory=dict)   # backend -> one-time registration
    example: Callable | None = None      # (generator, rows) -> the op's arguments, random, odd shapes (tests)

    @property
    def op(self):
        return getattr(torch.ops.sparsefx, self.name).default


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise ValueError(f"op {spec.name!r} is registered twice")
    if spec.args.op_name != spec.name:
        raise ValueError(f"{spec.args.__name__} views {spec.args.op_name!r}, not {spec.name!r}")
    REGISTRY[spec.name] = spec
    return spec


def triton_kernel(family: str, name: str) -> KernelLoader:
    """The ``kernels["triton"]`` loader of op ``name`` of the family package ``family``: imports its ``triton.py``
    (which registers ``sparsefx::triton_<name>`` and imports no triton until a kernel runs) when first lowered."""
    def load(int8_activations: bool):
        importlib.import_module(f"{family}.triton")
        return getattr(torch.ops.sparsefx, f"triton_{name}").default, f"triton.{name}"

    return load


def cpu_kernel_setup(op, kernel) -> Callable[[], None]:
    """A ``setup["cpu"]`` that registers ``kernel`` as the CPU implementation of the custom op ``op``."""
    def setup() -> None:
        op.register_kernel("cpu")(kernel)

    return setup


def spec_for_target(target) -> OpSpec | None:
    """The spec of a node target (``torch.ops.sparsefx.<name>`` or its ``.default``), or None."""
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    if not text.startswith("sparsefx::"):
        return None
    return REGISTRY.get(text[len("sparsefx::"):].split(".")[0])


def eager_kinds() -> dict[str, type[nn.Module]]:
    """``{kind: eager module class}`` over the registry (what artifacts name their compressed modules by)."""
    return {spec.eager.kind: spec.eager for spec in REGISTRY.values()}


def call_directly(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a module prepared by ``prepare_cpu_decode`` calls its ``decode_kernel`` as a plain function: the op
    dispatcher costs tens of us per call (x 200 linears per decoded token). Not under torch.compile (the op is
    traced) or autograd."""
    return (module.decode_kernel is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


__all__ = ["ArgsView", "OpSpec", "REGISTRY", "call_directly", "cpu_kernel_setup", "eager_kinds", "register",
           "spec_for_target", "triton_kernel"]
