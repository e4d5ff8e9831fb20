"""verify(gm): the IR invariants of sparsefx/ir/README.md, checked after every pass."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter

from ..errors import SparsefxError
from .annotate import LAYERS, LINEAR, linear_nodes
from .capture import EXAMPLE, get_param


class IRError(SparsefxError):
    """The graph breaks an IR invariant; the message names the node and the invariant."""


class _ShapeRecorder(Interpreter):
    """Runs the graph on fake tensors and records each linear's output shape."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, torch.Size] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.meta.get(LINEAR) is not None:
            self.shapes[n.name] = out.shape
        return out


def propagate_shapes(gm: GraphModule, batch: int = 1, seq: int = 5) -> dict[str, torch.Size]:
    """Re-propagate shapes through ``gm`` with fake tensors (no compute); return each linear's output shape.
    A whole-model graph gets token ids ``[batch, seq]``; a block or head graph its recorded example inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_flatten

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        if EXAMPLE in gm.meta:
            leaves = tree_flatten(gm.meta[EXAMPLE])[0]
            args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        else:
            args = [mode.from_tensor(torch.zeros(batch, seq, dtype=torch.long))]
        rec = _ShapeRecorder(gm)
        rec.run(*args)
    return rec.shapes


def verify(gm: GraphModule, propagate: bool = True) -> None:
    """Check the IR invariants; raise ``IRError`` naming the first broken one.

    1. ``gm.graph.lint()`` passes (well-formed graph, targets exist).
    2. Every linear node has ``meta['val']``; after annotation, every linear with a parameter weight has
       ``meta['sparsefx.linear']`` and its weight's shape equals ``[out_features, in_features]``.
    3. With ``propagate``, shapes re-propagated on fake tensors agree: linear outputs end in ``out_features``.

    Example:
        >>> verify(gm)  # doctest: +SKIP
    """
    try:
        gm.graph.lint()
    except Exception as exc:
        raise IRError(f"graph.lint failed: {exc}") from exc
    annotated = LAYERS in gm.meta
    for n in linear_nodes(gm):
        if "val" not in n.meta:
            raise IRError(f"linear node {n.name!r} has no meta['val']; a pass created it without shape metadata")
        info = n.meta.get(LINEAR)
        if info is None:
            if annotated and n.args[1].op == "get_attr":
                raise IRError(f"linear node {n.name!r} lacks meta['{LINEAR}'] in an annotated graph")
            continue
        w = get_param(gm, info.param)
        if tuple(w.shape) != (info.out_features, info.in_features):
            raise IRError(f"node {n.name!r}: weight {info.param} has shape {tuple(w.shape)}, annotation says "
                          f"({info.out_features}, {info.in_features}); update the LinearInfo when resizing")
    if propagate:
        infos = {n.name: n.meta[LINEAR] for n in linear_nodes(gm) if n.meta.get(LINEAR) is not None}
        for name, shape in propagate_shapes(gm).items():
            if shape[-1] != infos[name].out_features:
                raise IRError(f"node {name!r}: re-propagated output ends in {shape[-1]}, "
                              f"weight has {infos[name].out_features} rows")
