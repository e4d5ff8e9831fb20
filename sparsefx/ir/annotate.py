"""Annotate: find every linear node and say what it is — parameter, layer, role — from the graph's dataflow.

Roles come from structure, not from per-architecture name lists:
  * attention cores are ``scaled_dot_product_attention`` nodes (or softmax between two matmuls for eager
    attention); the linear feeding the query / key / value operand is q / k / v, the first linear fed by the
    core's output is o;
  * of the remaining linears in a layer, one whose producers are all other unclaimed linears of the same layer is
    down; among its producers, the one whose path passes through an activation is gate, the other up (a
    non-gated MLP has a single producer, called up);
  * a linear outside every layer is lm_head; a linear in a layer that fits none of these is ``other``.
The layer index is the first integer component of the parameter name (``model.layers.7.mlp...`` -> 7).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..errors import UnsupportedModelError
from .capture import get_param, param_name
from .meta import LAYERS, LINEAR

aten = torch.ops.aten

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")

_LINEAR_OPS = {aten.linear.default}
_SDPA_OPS = {aten.scaled_dot_product_attention.default}
_SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}
_MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
                aten.silu_.default, aten.gelu_.default, aten.relu_.default}
# Ops that use a 2-D parameter as a weight matrix but are not aten.linear: sparsefx cannot rewrite them yet.
_UNSUPPORTED_WEIGHT_OPS = {aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default,
                           aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default, aten.convolution.default}
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class LinearInfo:
    """What a linear node computes: ``y[..., out] = x[..., in] @ W[out, in].T (+ b)``."""

    node: str
    param: str                 # HF name of the weight, e.g. model.layers.0.self_attn.q_proj.weight
    bias: str | None
    layer: int | None
    role: str                  # one of ROLES, "lm_head" or "other"
    in_features: int
    out_features: int
    input_node: str            # node whose output feeds x (shared by q/k/v, by gate/up)

    @property
    def module(self) -> str:
        return self.param.rsplit(".", 1)[0]


@dataclass
class LayerInfo:
    """Per-layer attention geometry and the node name of each role's linear."""

    index: int
    linears: dict[str, str] = field(default_factory=dict)   # role -> node name
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None


def register_linear_op(target) -> None:
    """Declare a compressed op linear-like (``args[0]`` = x, ``args[1]`` = dense weight ``[out, in]``), so
    ``linear_nodes`` (and with it verification and later passes) sees the nodes a pass rewrote into it."""
    _LINEAR_OPS.add(target)


def linear_nodes(gm: GraphModule) -> list[Node]:
    """Every ``aten.linear`` node, and every node of a registered linear-like op, of ``gm`` in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LINEAR_OPS]


def annotated_linears(gm: GraphModule, roles=None) -> list[tuple[Node, LinearInfo]]:
    """``(node, info)`` for annotated linears, optionally only those whose role is in ``roles``."""
    out = []
    for n in linear_nodes(gm):
        info = n.meta.get(LINEAR)
        if info is not None and (roles is None or info.role in roles):
            out.append((n, info))
    return out


def _walk(starts, step, stop: set[Node], allowed: set[Node] | None = None) -> tuple[set[Node], set[Node]]:
    """Breadth-first walk from ``starts`` along ``step(node)``; stop at (and collect) nodes in ``stop``, never
    leave ``allowed`` when given. Returns (stop nodes reached, nodes visited)."""
    found, seen, todo = set(), set(), deque(starts)
    while todo:
        n = todo.popleft()
        if n in seen or (allowed is not None and n not in allowed):
            continue
        seen.add(n)
        if n in stop:
            found.add(n)
        else:
            todo.extend(step(n))
    return found, seen


def _inputs(n: Node):
    return [a for a in n.all_input_nodes if a.op not in ("get_attr", "placeholder")]


def _producers(start: Node, stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Walk inputs backwards from ``start`` up to nodes in ``stop``; return (stop nodes reached, nodes visited)."""
    return _walk([start], _inputs, stop)


def _consumers(start: Node, stop: set[Node]) -> set[Node]:
    """Walk users forwards from ``start``; return the first nodes in ``stop`` on each path."""
    return _walk(start.users, lambda n: n.users, stop)[0]


def _attention_cores(gm: GraphModule) -> list[tuple[Node, Node, Node, Node]]:
    """``(query_src, key_src, value_src, output)`` for each attention core in the graph."""
    cores = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SDPA_OPS:
            cores.append((n.args[0], n.args[1], n.args[2], n))
        elif n.target in _SOFTMAX_OPS:
            # eager attention: softmax(q @ k^T [* scale] [+ mask]) @ v
            qk, _ = _producers(n.args[0], {m for m in gm.graph.nodes if m.target in _MATMUL_OPS})
            pv = [u for u in _consumers(n, {m for m in gm.graph.nodes if m.target in _MATMUL_OPS})]
            if len(qk) == 1 and len(pv) == 1:
                mm = next(iter(qk))
                cores.append((mm.args[0], mm.args[1], pv[0].args[1], pv[0]))
    return cores


def _check_supported(gm: GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _UNSUPPORTED_WEIGHT_OPS:
            continue
        for a in n.all_input_nodes:
            name = param_name(gm, a)
            weight = _param_or_none(gm, name) if name is not None else None
            if weight is not None and weight.dim() >= 2:
                raise UnsupportedModelError(
                    f"unsupported op {n.target} at node {n.name!r} uses parameter {name!r} as a weight matrix; "
                    "sparsefx compresses aten.linear only (nn.Linear). Replace the module (e.g. HF Conv1D) with "
                    "nn.Linear before compressing"
                )


def _param_or_none(gm: GraphModule, name: str):
    try:
        return get_param(gm, name)
    except AttributeError:
        return None


def annotate(gm: GraphModule) -> dict[int, LayerInfo]:
    """Attach ``LinearInfo`` to every linear node (``node.meta['sparsefx.linear']``) and ``LayerInfo`` to ``gm``.

    Example:
        >>> layers = annotate(capture(tiny_model("llama")))
        >>> sorted(layers[0].linears)
        ['down', 'gate', 'k', 'o', 'q', 'up', 'v']
    """
    _check_supported(gm)
    linears = [n for n in linear_nodes(gm) if n.target == aten.linear.default]
    if not linears:
        raise UnsupportedModelError("the captured graph has no aten.linear node; nothing for sparsefx to compress")
    infos: dict[Node, LinearInfo] = {}
    for n in linears:
        weight = n.args[1]
        pname = param_name(gm, weight)
        if pname is None:
            continue  # weight computed at run time (not a parameter): not compressible, left alone
        bias = n.args[2] if len(n.args) > 2 and n.args[2] is not None else None
        w = get_param(gm, pname)
        m = _LAYER_RE.search("." + pname)
        infos[n] = LinearInfo(node=n.name, param=pname, bias=param_name(gm, bias) if bias is not None else None,
                              layer=int(m.group(1)) if m else None, role="other",
                              in_features=w.shape[1], out_features=w.shape[0], input_node=n.args[0].name)
    stop = set(infos)
    layers: dict[int, LayerInfo] = {}

    # Attention: q/k/v are the linears feeding the core's operands; o is the first linear after its output.
    for q_src, k_src, v_src, out in _attention_cores(gm):
        for role, src in (("q", q_src), ("k", k_src), ("v", v_src)):
            for lin in _producers(src, stop)[0]:
                infos[lin].role = role
        for lin in _consumers(out, stop):
            infos[lin].role = "o"
        q_lins = _producers(q_src, stop)[0]
        k_lins = _producers(k_src, stop)[0]
        if len(q_lins) == 1 and len(k_lins) == 1:
            q_info, k_info = infos[next(iter(q_lins))], infos[next(iter(k_lins))]
            head_dim = int(q_src.meta["val"].shape[-1]) if "val" in getattr(q_src, "meta", {}) else None
            if q_info.layer is not None and head_dim:
                li = layers.setdefault(q_info.layer, LayerInfo(q_info.layer))
                li.head_dim = head_dim
                li.num_heads = q_info.out_features // head_dim
                li.num_kv_heads = k_info.out_features // head_dim

    # MLP: down is fed only by unclaimed linears of its own layer; gate is the producer behind an activation.
    for n, info in infos.items():
        if info.role != "other" or info.layer is None:
            continue
        prods, visited = _producers(n.args[0], stop)
        if not prods or any(infos[p].role != "other" or infos[p].layer != info.layer for p in prods):
            continue
        info.role = "down"
        for p in prods:
            on_path = _consumers_within(p, visited)
            gated = len(prods) > 1 and any(m.target in ACTIVATIONS for m in on_path)
            infos[p].role = "gate" if gated else "up"

    for n, info in infos.items():
        if info.layer is None:
            info.role = "lm_head" if info.role == "other" else info.role
        n.meta[LINEAR] = info
        if info.layer is not None and info.role in ROLES:
            layers.setdefault(info.layer, LayerInfo(info.layer)).linears[info.role] = n.name
    gm.meta[LAYERS] = layers
    return layers


def _consumers_within(start: Node, allowed: set[Node]) -> set[Node]:
    """Nodes reachable forwards from ``start`` while staying inside ``allowed``."""
    return _walk(start.users, lambda n: n.users, set(), allowed)[1]
