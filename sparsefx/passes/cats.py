"""CATS — Contextually-Aware Thresholding for Sparsity (Lee et al. 2024), an activation-sparsity baseline.

CATS sparsifies only the gated MLP: ``down(act(gate(x)) * up(x))``. The activation output ``a = act(gate(x))`` is
thresholded, ``a_i -> 0`` where ``|a_i| < t``, with ``t`` the calibrated quantile of |a| at the target sparsity.
A zeroed ``a_i`` makes channel i of ``up`` and of ``down`` unnecessary, so the multiply-adds skipped per token are
``p * (MACs(up) + MACs(down))`` — gate and attention stay dense, and whole-model effective sparsity is lower than
the activation sparsity ``p`` (at most 2/3 of the MLP's share).

The pass finds each MLP's activation node from the annotated roles (the activation between the gate linear and
the down linear's input), observes its output on the calibration data, and inserts ``sparsefx::threshold`` after
it. Lowering replaces the HF activation module (``mlp.act_fn``) by ``ThresholdedAct``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.meta import MODULE
from ..errors import RecipeError, UnsupportedModelError
from .. import ops as _ops  # noqa: F401  (registers sparsefx::threshold)
from ..ir.annotate import ACTIVATIONS, LAYERS, annotated_linears
from ..ir.meta import CATS, param_prefix
from .base import Pass, PassReport, PassResult
from .calibrate import observe
from .config import PassConfig, check_fraction, normalize_overrides, override_for, register_pass


@dataclass(frozen=True)
class CatsConfig(PassConfig):
    """sparsity: fraction of MLP activation values zeroed (CATS's own measure, not effective sparsity);
    overrides: glob over the gate weight's parameter name -> sparsity."""

    method = "cats"
    sparsity: float = 0.5
    overrides: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        check_fraction(self.sparsity, "cats.sparsity")
        normalize_overrides(self, check_fraction)


def _module_path(node) -> str | None:
    """HF module that computes ``node`` when it is a module of its own (``model.layers.0.mlp.act_fn``), else None."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return str(stack[-1][0]) if stack else None


def _activation_after(gate) -> torch.fx.Node:
    """The activation node on the gate linear's path to the down linear (at most a few view ops away)."""
    todo, seen = [gate], set()
    while todo:
        n = todo.pop(0)
        if n in seen or len(seen) > 16:
            continue
        seen.add(n)
        if n is not gate and n.op == "call_function" and n.target in ACTIVATIONS:
            return n
        todo.extend(n.users)
    raise UnsupportedModelError(f"cats: no activation found after the gate linear {gate.name!r}")


@register_pass(CatsConfig)
class CatsPass(Pass):
    """Threshold each gated MLP's activation output at its calibrated quantile."""

    name = "cats"
    requires = ("annotated",)
    provides = ("tiered",)
    uses_calibration = True

    def __init__(self, config: CatsConfig):
        self.config = config

    @torch.no_grad()
    def run(self, gm, ctx):
        prefix = param_prefix(gm)
        linears = {n.name: (n, info) for n, info in annotated_linears(gm)}
        plans = []  # (activation node, gate info, up info, down info, sparsity)
        for layer in gm.meta.get(LAYERS, {}).values():
            if not all(r in layer.linears for r in ("gate", "up", "down")):
                continue
            gate, gate_info = linears[layer.linears["gate"]]
            p = float(override_for(self.config, gate_info.param, self.config.sparsity))
            if p > 0:
                plans.append((_activation_after(gate), gate_info, linears[layer.linears["up"]][1],
                              linears[layer.linears["down"]][1], p))
        if not plans:
            if any(info.role in ("q", "k", "v", "o") for _, info in linears.values()):
                raise RecipeError("cats needs gated MLPs (gate, up and down linears); this model has none")
            return PassResult(gm, False, PassReport(self.name))
        stats = observe(gm, [act for act, *_ in plans], ctx)
        total = sum(info.in_features * info.out_features for _, info in linears.values() if info.layer is not None)
        skipped, per_layer = 0.0, {}
        report = PassReport(self.name)
        for act, gate_info, up_info, down_info, p in plans:
            s = stats[act.name]
            t = s.quantile(p)
            p_real = s.fraction_below(t)
            with gm.graph.inserting_after(act):
                thr = gm.graph.call_function(torch.ops.sparsefx.threshold.default, (act, t))
            act.replace_all_uses_with(thr, delete_user_cb=lambda user: user is not thr)
            thr.meta.update({k: v for k, v in act.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
            path = _module_path(act)
            if path is not None and path.startswith(prefix):
                thr.meta[MODULE] = path[len(prefix):]
            thr.meta[CATS] = {"t": t, "p": p_real}
            skipped += p_real * (up_info.in_features * up_info.out_features
                                 + down_info.in_features * down_info.out_features)
            per_layer[gate_info.layer] = {"t": t, "activation_sparsity": round(p_real, 4)}
            report.nodes_added.append(thr.name)
        gm.recompile()
        report.matches = len(plans)
        report.details = {"effective_sparsity": skipped / total if total else 0.0, "per_layer": per_layer,
                          "macs_skipped": skipped, "macs_total": total}
        return PassResult(gm, True, report)
