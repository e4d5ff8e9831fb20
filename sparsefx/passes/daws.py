"""DAWS — Dual Activation-Weight Sparsity: three-tier activation routing per linear, training-free.

For ``y = W x``, each input channel is routed by |x_i| against two calibrated thresholds:
high (|x_i| >= t_high) uses the full weights, medium (t_low <= |x_i| < t_high) uses magnitude-pruned weights
(plain |W|, per row, at ``medium_weight_sparsity``), low (|x_i| < t_low) is dropped.

Effective sparsity = fraction of weight multiply-adds skipped per token
                   = P(low) + P(medium) * medium_weight_sparsity.
A recipe gives the target effective sparsity ``e`` and the medium tier's share ``m`` of channels; calibration
solves the tier quantiles q_low = e - m * s_w, q_high = q_low + m (m is capped at e / s_w so q_low >= 0) and
reads the thresholds off the |x| histogram of each linear's input. Each linear node becomes one
``sparsefx::tiered_linear`` node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError
from ..ir import ops as _ops  # noqa: F401  (registers sparsefx::tiered_linear)
from ..ir.annotate import ROLES, annotated_linears
from ..ir.capture import get_param
from .base import Pass, PassReport, PassResult
from .calibrate import STATS, ActStats
from .config import PassConfig, normalize_overrides, override_for, register_pass
from .masks import compute_mask

TIERS = "sparsefx.tiers"  # node.meta key -> dict of thresholds and predicted tier fractions


def _fraction(value: Any, field: str, upper_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value and (
        value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        raise RecipeError(f"{field}: expected a number in [0, {'1)' if upper_open else '1]'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DawsConfig(PassConfig):
    """sparsity: target effective sparsity; medium_fraction: share of channels in the medium tier;
    medium_weight_sparsity: magnitude sparsity of the medium tier's weights; roles/overrides as for masks
    (overrides map a glob over parameter names to an effective sparsity)."""

    method = "daws"
    sparsity: float = 0.5
    medium_fraction: float = 0.2
    medium_weight_sparsity: float = 0.5
    roles: tuple[str, ...] = ROLES
    overrides: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        _fraction(self.sparsity, "daws.sparsity")
        _fraction(self.medium_fraction, "daws.medium_fraction", upper_open=False)
        _fraction(self.medium_weight_sparsity, "daws.medium_weight_sparsity")
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise RecipeError(f"daws.roles: unknown role(s) {bad or '(empty)'}; choose from {list(ROLES)}")
        normalize_overrides(self, _fraction)

    def target_for(self, param: str) -> float:
        return float(override_for(self, param, self.sparsity))


@dataclass(frozen=True)
class Tiers:
    t_high: float
    t_low: float
    p_low: float       # predicted fraction of |x| in each tier (from the calibration histogram)
    p_medium: float
    p_high: float

    def effective_sparsity(self, medium_weight_sparsity: float) -> float:
        return self.p_low + self.p_medium * medium_weight_sparsity


def solve_tiers(stats: ActStats, sparsity: float, medium_fraction: float, medium_weight_sparsity: float) -> Tiers:
    """Thresholds that give ``sparsity`` effective sparsity with a medium tier of ``medium_fraction`` channels.

    Example:
        >>> tiers = solve_tiers(node.meta["sparsefx.stats"], 0.5, 0.2, 0.5)  # doctest: +SKIP
    """
    m = medium_fraction
    if medium_weight_sparsity > 0:
        m = min(m, sparsity / medium_weight_sparsity)
    q_low = max(0.0, sparsity - m * medium_weight_sparsity)
    q_high = min(1.0, q_low + m)
    t_low = stats.quantile(q_low) if q_low > 0 else 0.0
    t_high = stats.quantile(q_high) if q_high > 0 else 0.0
    p_low = stats.fraction_below(t_low)
    p_below_high = stats.fraction_below(t_high)
    return Tiers(t_high, t_low, p_low, p_below_high - p_low, 1.0 - p_below_high)


@register_pass(DawsConfig)
class DawsPass(Pass):
    """Rewrite each selected linear into ``sparsefx::tiered_linear`` with calibrated thresholds."""

    name = "daws"
    requires = ("annotated", "calibrated")
    provides = ("tiered",)

    def __init__(self, config: DawsConfig):
        self.config = config

    @torch.no_grad()
    def run(self, gm, ctx):
        op = torch.ops.sparsefx.tiered_linear.default
        prefix = gm.meta.get("sparsefx.prefix", "")
        report = PassReport(self.name)
        per_param: dict[str, dict] = {}
        skipped = total = 0
        s_w = self.config.medium_weight_sparsity
        for node, info in annotated_linears(gm, self.config.roles):
            if node.target != torch.ops.aten.linear.default:
                continue
            target = self.config.target_for(info.param)
            macs = info.in_features * info.out_features
            total += macs
            if target == 0.0:
                continue
            stats = node.meta.get(STATS)
            if stats is None:
                raise RecipeError(f"daws needs activation statistics for {info.param}; run the calibrate pass first")
            tiers = solve_tiers(stats, target, self.config.medium_fraction, s_w)
            w = get_param(gm, info.param)
            w_medium = w * compute_mask(w.abs(), s_w).to(w.dtype)
            module = gm.get_submodule(prefix + info.module)
            module.register_buffer("weight_medium", w_medium)
            weight_node = node.args[1]
            bias_node = node.args[2] if len(node.args) > 2 else None
            with gm.graph.inserting_before(node):
                wm_node = gm.graph.get_attr(prefix + info.module + ".weight_medium")
                wm_node.meta.update({k: v for k, v in weight_node.meta.items() if k in ("val", "tensor_meta")})
                new = gm.graph.call_function(op, (node.args[0], weight_node, wm_node, bias_node,
                                                  tiers.t_high, tiers.t_low))
            new.meta.update(node.meta)
            effective = tiers.effective_sparsity(s_w)
            new.meta[TIERS] = {**tiers.__dict__, "effective_sparsity": effective}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            per_param[info.param] = {"t_high": tiers.t_high, "t_low": tiers.t_low, "p_high": round(tiers.p_high, 4),
                                     "p_medium": round(tiers.p_medium, 4), "p_low": round(tiers.p_low, 4),
                                     "effective_sparsity": round(effective, 4)}
            skipped += effective * macs
            report.params_changed.append(info.param)
        gm.recompile()
        report.matches = len(per_param)
        report.details = {"effective_sparsity": skipped / total if total else 0.0, "per_param": per_param}
        return PassResult(gm, bool(per_param), report)
