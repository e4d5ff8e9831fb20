"""Greedy per-layer sparsity allocation inside each transformer block (TEAL's block-wise greedy, generalised).

Uniform sparsity treats a 576x192 k_proj like a 1536x576 down_proj; they do not suffer alike. The greedy search
runs one block at a time on its *dense* calibration inputs:

    start with every linear of the block dense;
    repeat until the block's MAC-weighted sparsity reaches the target:
        for each linear, try raising its sparsity by one step and measure the block's output error;
        keep the step with the least error added per MAC skipped.

TEAL compares raw errors of equal-MAC steps; here steps are capped (a k_proj with 3% of the block's MACs
would otherwise jump by 0.8 at once), so candidates are compared by error added per unit of block sparsity.

The search works on the IR: ``torch.fx.passes.split_module`` cuts the graph into one submodule per layer (nodes
are assigned by the layer index in their ``nn_module_stack``), the block inputs are recorded once from the dense
model, and each trial rewrites the thresholds of the layer's compressed nodes and re-runs that submodule only.
A ``Knob`` says how a node's arguments encode a sparsity, so the search serves any thresholded op.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_leaves

from .. import distributed
from ..errors import CalibrationError
from ..ir.meta import KNOB as _KNOB
from .calibrate import calibration_args

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class Knob:
    """One tunable node: ``set(node, sparsity)`` rewrites the node's arguments for that sparsity."""

    node: str                               # node name in the unsplit graph
    layer: int
    macs: int                               # multiply-adds per token at sparsity 0
    set: Callable[[Node, float], None]
    max_sparsity: float = 0.9


def _layer_of(node: Node) -> int | None:
    for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        m = _LAYER_RE.search(str(path))
        if m:
            return int(m.group(1))
    if node.op == "get_attr":
        m = _LAYER_RE.search(str(node.target))
        return int(m.group(1)) if m else None
    return None


def split_by_layer(gm: GraphModule) -> tuple[GraphModule, dict[int, str]]:
    """Cut ``gm`` into submodules: everything before the first layer, one per layer, everything after.

    Returns the split module and ``{layer index: submodule name}``.

    Example:
        >>> split, names = split_by_layer(gm)  # doctest: +SKIP
        >>> names[0]
        'submod_1'
    """
    layers = sorted({ly for n in gm.graph.nodes if (ly := _layer_of(n)) is not None})
    if not layers:
        raise CalibrationError("greedy allocation needs transformer layers, but no node of the graph carries a "
                               "'layers.<i>' module path in its nn_module_stack")
    last = layers[-1] + 2
    seen = False

    def partition(node: Node) -> int:
        nonlocal seen
        layer = _layer_of(node)
        if layer is not None:
            seen = True
            return layer + 1
        return last if seen else 0

    split = split_module(gm, gm, partition)
    return split, {ly: f"submod_{ly + 1}" for ly in layers}


def _record_inputs(split: GraphModule, names: dict[int, str], tokens, batch_size: int):
    """Run the split (dense) model once and keep each layer submodule's positional inputs, per batch.
    ``tokens``: token ids ``[N, S]`` or a block's ``BlockInputs``."""
    inputs: dict[int, list[tuple]] = {ly: [] for ly in names}
    hooks = []
    for ly, name in names.items():
        def hook(_mod, args, ly=ly):
            inputs[ly].append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        hooks.append(split.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for args in calibration_args(tokens, batch_size):
            split(*tree_leaves(args))   # split_module's graph takes the flattened inputs
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _sq_err(outs, targets) -> float:
    """Relative squared error of the block's outputs, summed over this process's batches and then over all
    processes of a ``torchrun`` calibration (so every rank takes the same greedy step)."""
    num = den = 0.0
    for o, t in zip(outs, targets):
        for a, b in zip(tree_leaves(o), tree_leaves(t)):
            num += float((a.float() - b.float()).pow(2).sum())
            den += float(b.float().pow(2).sum())
    num, den = distributed.all_reduce_floats([num, den])
    return num / max(den, 1e-30)


@torch.no_grad()
def greedy_allocate(gm: GraphModule, knobs: list[Knob], targets: dict[int, float], tokens,
                    batch_size: int = 4, block_step: float = 0.05, max_step: float = 0.2,
                    progress: bool = True) -> dict[str, float]:
    """Per-knob sparsities such that each layer's MAC-weighted sparsity equals ``targets[layer]``.

    ``tokens``: calibration ids ``[N, S]`` (a few thousand tokens suffice), or a block's ``BlockInputs``. ``block_step``: the block sparsity one step
    adds (the step of a linear holding a share ``f`` of the block's MACs is ``block_step / f``, at most
    ``max_step``). ``gm`` is left unchanged; the caller applies the result.

    Example:
        >>> alloc = greedy_allocate(gm, knobs, {i: 0.5 for i in range(30)}, calib[:2])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    by_name = {n.name: n for n in gm.graph.nodes}
    saved = {k.node: by_name[k.node].args for k in knobs}
    for k in knobs:  # split the dense graph; tag knob nodes (split_module renames nodes but copies their meta)
        k.set(by_name[k.node], 0.0)
        by_name[k.node].meta[_KNOB] = k.node
    gm.recompile()
    try:
        split, names = split_by_layer(gm)
    finally:
        for name, args in saved.items():
            by_name[name].args = args
            del by_name[name].meta[_KNOB]
        gm.recompile()
    inputs = _record_inputs(split, names, tokens, batch_size)
    by_layer: dict[int, list[Knob]] = {}
    for k in knobs:
        by_layer.setdefault(k.layer, []).append(k)
    result: dict[str, float] = {}
    for layer in tqdm(sorted(by_layer), desc="greedy allocation", unit="layer", disable=not progress):
        sub = split.get_submodule(names[layer])
        sub_nodes = {n.meta[_KNOB]: n for n in sub.graph.nodes if _KNOB in n.meta}
        missing = [k.node for k in by_layer[layer] if k.node not in sub_nodes]
        if missing:
            raise CalibrationError(f"greedy allocation lost nodes {missing} when splitting layer {layer}")
        result.update(_greedy_block(sub, sub_nodes, by_layer[layer], inputs[layer], targets[layer],
                                    block_step, max_step))
    return result


def _greedy_block(sub: GraphModule, nodes: dict[str, Node], knobs: list[Knob], inputs: list[tuple], target: float,
                  block_step: float, max_step: float) -> dict[str, float]:
    total = sum(k.macs for k in knobs)
    level = {k.node: 0.0 for k in knobs}

    def run(levels: dict[str, float]):
        for k in knobs:
            k.set(nodes[k.node], levels[k.node])
        sub.recompile()
        return [sub(*args) for args in inputs]

    dense = run(level)
    err = 0.0
    reached = 0.0  # MAC-weighted sparsity of the block so far
    while reached < target - 1e-9:
        best = None
        for k in knobs:
            share = k.macs / total
            step = min(max_step, block_step / share, k.max_sparsity - level[k.node], (target - reached) / share)
            if step <= 1e-9:
                continue
            trial = dict(level, **{k.node: level[k.node] + step})
            e = _sq_err(run(trial), dense)
            score = (e - err) / (step * share)
            if best is None or score < best[0]:
                best = (score, k, step, e)
        if best is None:  # every knob at its cap: the target is out of reach
            raise CalibrationError(f"greedy allocation cannot reach block sparsity {target:.3f}: every linear is at "
                                   f"its maximum; lower the target or raise max_sparsity")
        _, k, step, err = best
        level[k.node] += step
        reached += step * k.macs / total
    for k in knobs:  # leave the block as searched (the caller re-applies on the unsplit graph)
        k.set(nodes[k.node], level[k.node])
    return {name: (0.0 if math.isclose(v, 0.0, abs_tol=1e-12) else v) for name, v in level.items()}
