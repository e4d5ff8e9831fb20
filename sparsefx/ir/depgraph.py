"""Dependency graph of coupled dimensions (networkx), in the manner of Torch-Pruning's dependency groups.

A graph node is one axis of one parameter: ``(param name, axis)``; axis 0 = output rows, 1 = input columns.
An edge says two axes must be pruned together. Each node carries ``block``: how many consecutive elements of
that axis make one structural unit. Per layer, the edges are derived from the annotated roles:

  q.out -- o.in          a query head is q rows [h*D:(h+1)*D] and o columns [h*D:(h+1)*D]
  k.out -- v.out         a KV head is k rows and v rows [g*D:(g+1)*D]
  k.out -- q.out         GQA: KV head g serves query heads g*r .. g*r+r-1 (HF repeat_kv layout), r = H / Hkv
  gate.out -- up.out -- down.in   an MLP channel
  bias -- its weight's out axis

A connected component is a *group*; its *units* are what structured pruning removes: one KV group (its KV head
and the r query heads it serves) for attention, one channel for an MLP. Within a component every node has the
same number of units, so unit ``u`` is elements ``[u*block, (u+1)*block)`` of every member axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import GraphModule

from ..errors import UnsupportedModelError
from .annotate import LAYERS, annotated_linears
from .capture import get_param
from .meta import DEPGRAPH


@dataclass(frozen=True)
class Group:
    """Coupled axes of one layer's attention or MLP, and how many structural units they hold."""

    kind: str                                  # "attention" | "mlp"
    layer: int
    n_units: int
    members: tuple[tuple[str, int, int], ...]  # (param name, axis, block)

    def unit_slices(self, unit: int) -> dict[tuple[str, int], slice]:
        """Elements of each member axis that unit ``unit`` owns: ``{(param, axis): slice}``."""
        if not 0 <= unit < self.n_units:
            raise IndexError(f"unit {unit} out of range for a group of {self.n_units} units")
        return {(p, ax): slice(unit * b, (unit + 1) * b) for p, ax, b in self.members}


def build_dependency_graph(gm: GraphModule) -> nx.Graph:
    """Build (and cache in ``gm.meta``) the coupled-dimension graph of an annotated GraphModule.

    Example:
        >>> g = build_dependency_graph(gm)  # doctest: +SKIP
        >>> g.has_edge(("model.layers.0.mlp.up_proj.weight", 0), ("model.layers.0.mlp.down_proj.weight", 1))
        True
    """
    if LAYERS not in gm.meta:
        raise UnsupportedModelError("build_dependency_graph needs an annotated graph; run ir.annotate(gm) first")
    g = nx.Graph()
    by_layer: dict[int, dict] = {}
    for _, i in annotated_linears(gm):
        if i.layer is not None:
            by_layer.setdefault(i.layer, {})[i.role] = i

    def add(param: str, axis: int, block: int, layer: int, kind: str) -> tuple[str, int]:
        g.add_node((param, axis), block=block, layer=layer, kind=kind,
                   size=get_param(gm, param).shape[axis])
        return (param, axis)

    for layer, roles in by_layer.items():
        geo = gm.meta[LAYERS][layer]
        if {"q", "k", "v", "o"} <= roles.keys() and geo.head_dim:
            d, r = geo.head_dim, geo.num_heads // geo.num_kv_heads
            q = add(roles["q"].param, 0, r * d, layer, "attention")
            o = add(roles["o"].param, 1, r * d, layer, "attention")
            k = add(roles["k"].param, 0, d, layer, "attention")
            v = add(roles["v"].param, 0, d, layer, "attention")
            g.add_edge(q, o, coupling="head")
            g.add_edge(k, v, coupling="kv_head")
            g.add_edge(k, q, coupling="gqa", ratio=r)
            for role, node in (("q", q), ("k", k), ("v", v)):
                if roles[role].bias:
                    g.add_edge(node, add(roles[role].bias, 0, g.nodes[node]["block"], layer, "attention"),
                               coupling="bias")
        if "down" in roles and ("up" in roles or "gate" in roles):
            down = add(roles["down"].param, 1, 1, layer, "mlp")
            for role in ("gate", "up"):
                if role in roles:
                    out = add(roles[role].param, 0, 1, layer, "mlp")
                    g.add_edge(out, down, coupling="channel")
                    if roles[role].bias:
                        g.add_edge(out, add(roles[role].bias, 0, 1, layer, "mlp"), coupling="bias")
    gm.meta[DEPGRAPH] = g
    return g


def coupled_groups(gm: GraphModule) -> list[Group]:
    """The connected components of the dependency graph as ``Group`` objects, sorted by (layer, kind).

    Example:
        >>> [(g.kind, g.layer, g.n_units) for g in coupled_groups(gm)][:2]  # doctest: +SKIP
        [('attention', 0, 2), ('mlp', 0, 96)]
    """
    g = gm.meta.get(DEPGRAPH) or build_dependency_graph(gm)
    groups = []
    for comp in nx.connected_components(g):
        nodes = sorted(comp)
        units = {g.nodes[n]["size"] // g.nodes[n]["block"] for n in nodes}
        if len(units) != 1 or any(g.nodes[n]["size"] % g.nodes[n]["block"] for n in nodes):
            raise UnsupportedModelError(f"coupled axes {nodes} do not split into the same number of units; "
                                        "the layer's head geometry is inconsistent")
        first = g.nodes[nodes[0]]
        groups.append(Group(first["kind"], first["layer"], units.pop(),
                            tuple((p, ax, g.nodes[(p, ax)]["block"]) for p, ax in nodes)))
    return sorted(groups, key=lambda x: (x.layer, x.kind))


def unit_mask(gm: GraphModule, group: Group, keep: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Element-level keep masks per member axis from a unit-level ``keep: [n_units] bool``."""
    if keep.shape != (group.n_units,):
        raise ValueError(f"keep must have shape ({group.n_units},), got {tuple(keep.shape)}")
    return {(p, ax): keep.repeat_interleave(b) for p, ax, b in group.members}


__all__ = ["Group", "build_dependency_graph", "coupled_groups", "unit_mask"]
