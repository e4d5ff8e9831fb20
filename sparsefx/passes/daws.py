"""DAWS — Dual Activation-Weight Sparsity: three-tier activation routing per linear, training-free.

For ``y = W x``, each input channel is routed by |x_i| against two calibrated thresholds:
high (|x_i| >= t_high) uses the full weights, medium (t_low <= |x_i| < t_high) uses magnitude-pruned weights
(plain |W|, per row, at ``medium_weight_sparsity``), low (|x_i| < t_low) is dropped.

Effective sparsity = fraction of weight multiply-adds skipped per token
                   = P(low) + P(medium) * medium_weight_sparsity.
A recipe gives the target effective sparsity ``e`` and the medium tier's share ``m`` of channels; calibration
solves the tier quantiles q_low = e - m * s_w, q_high = q_low + m (m is capped at e / s_w so q_low >= 0, and at
(1 - e) / (1 - s_w) so q_high <= 1: a high target with a wide medium tier leaves no high tier) and
reads the thresholds off the |x| histogram of each linear's input. Each linear node becomes one
``sparsefx::tiered_linear`` node.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..errors import RecipeError
from ..ir import ops as _ops  # noqa: F401  (registers sparsefx::tiered_linear)
from ..ir.annotate import ROLES, annotated_linears
from ..ir.capture import get_param
from .allocate import Knob, greedy_allocate
from .base import Pass, PassReport, PassResult
from .calibrate import STATS, ActStats
from .config import PassConfig, check_fraction, normalize_overrides, override_for, register_pass
from .masks import compute_mask

ALLOCATIONS = ("uniform", "greedy")
MEDIUM_DTYPES = (None, "float16", "bfloat16")
TIERS = "sparsefx.tiers"  # node.meta key -> dict of thresholds and predicted tier fractions


@dataclass(frozen=True)
class DawsConfig(PassConfig):
    """sparsity: target effective sparsity; medium_fraction: share of channels in the medium tier;
    medium_weight_sparsity: magnitude sparsity of the medium tier's weights; roles/overrides as for masks
    (overrides map a glob over parameter names to an effective sparsity); allocation: ``uniform`` gives every
    linear its target, ``greedy`` redistributes each block's budget by the block-output-error search of
    ``passes.allocate``; medium_dtype: storage dtype of the medium tier's weights (``None``: the weight's own;
    ``float16`` halves the bytes the CPU decode kernel reads per medium channel, math stays in the input's dtype)."""

    method = "daws"
    sparsity: float = 0.5
    medium_fraction: float = 0.2
    medium_weight_sparsity: float = 0.5
    roles: tuple[str, ...] = ROLES
    overrides: tuple[tuple[str, float], ...] = ()
    allocation: str = "uniform"        # "uniform" (every linear at its target) or "greedy" (block-wise search)
    greedy_tokens: int = 512           # calibration tokens the greedy search runs each block on
    greedy_step: float = 0.05          # block sparsity added per greedy step
    max_sparsity: float = 0.9          # no linear goes above this under greedy allocation
    medium_dtype: str | None = None    # None (the weight's dtype), "float16" or "bfloat16"

    def validate(self) -> None:
        check_fraction(self.sparsity, "daws.sparsity")
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(f"daws.allocation: expected one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if not isinstance(self.greedy_tokens, int) or self.greedy_tokens < 1:
            raise RecipeError(f"daws.greedy_tokens: expected a positive integer, got {self.greedy_tokens!r}")
        if check_fraction(self.greedy_step, "daws.greedy_step") == 0.0:
            raise RecipeError("daws.greedy_step: must be > 0")
        if check_fraction(self.max_sparsity, "daws.max_sparsity") < self.sparsity:
            raise RecipeError(f"daws.max_sparsity ({self.max_sparsity}) is below daws.sparsity ({self.sparsity})")
        check_fraction(self.medium_fraction, "daws.medium_fraction", upper_open=False)
        check_fraction(self.medium_weight_sparsity, "daws.medium_weight_sparsity")
        if self.medium_dtype not in MEDIUM_DTYPES:
            raise RecipeError(f"daws.medium_dtype: expected one of {list(MEDIUM_DTYPES)}, got {self.medium_dtype!r}")
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise RecipeError(f"daws.roles: unknown role(s) {bad or '(empty)'}; choose from {list(ROLES)}")
        normalize_overrides(self, check_fraction)

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
    if medium_weight_sparsity > 0:  # q_low >= 0
        m = min(m, sparsity / medium_weight_sparsity)
    if medium_weight_sparsity < 1:  # q_low + m <= 1: at high targets the high tier runs out before the medium tier
        m = min(m, (1.0 - sparsity) / (1.0 - medium_weight_sparsity))
    q_low = max(0.0, sparsity - m * medium_weight_sparsity)
    q_high = min(1.0, q_low + m)
    t_low = stats.quantile(q_low) if q_low > 0 else 0.0
    t_high = stats.quantile(q_high) if q_high > 0 else 0.0
    p_low = stats.fraction_below(t_low)
    p_below_high = stats.fraction_below(t_high)
    return Tiers(t_high, t_low, p_low, p_below_high - p_low, 1.0 - p_below_high)


def _set_tiers(node, tiers: Tiers) -> None:
    node.update_arg(4, tiers.t_high)
    node.update_arg(5, tiers.t_low)


@register_pass(DawsConfig)
class DawsPass(Pass):
    """Rewrite each selected linear into ``sparsefx::tiered_linear`` with calibrated thresholds."""

    name = "daws"
    requires = ("annotated", "calibrated")
    provides = ("tiered",)

    def __init__(self, config: DawsConfig):
        self.config = config

    def solve(self, stats: ActStats, sparsity: float) -> Tiers:
        if sparsity <= 0.0:
            return Tiers(0.0, 0.0, 0.0, 0.0, 1.0)
        c = self.config
        return solve_tiers(stats, sparsity, c.medium_fraction, c.medium_weight_sparsity)

    @torch.no_grad()
    def run(self, gm, ctx):
        op = torch.ops.sparsefx.tiered_linear.default
        prefix = gm.meta.get("sparsefx.prefix", "")
        report = PassReport(self.name)
        s_w = self.config.medium_weight_sparsity
        rewritten = []  # (new node, info, stats, target)
        total = 0
        for node, info in annotated_linears(gm, self.config.roles):
            if node.target != torch.ops.aten.linear.default:
                continue
            target = self.config.target_for(info.param)
            total += info.in_features * info.out_features
            if target == 0.0:
                continue
            stats = node.meta.get(STATS)
            if stats is None:
                raise RecipeError(f"daws needs activation statistics for {info.param}; run the calibrate pass first")
            weight_node = node.args[1]
            bias_node = node.args[2] if len(node.args) > 2 else None
            wm_node = weight_node  # no medium tier (TEAL-style): t_low == t_high, the medium weights are never read
            if self.config.medium_fraction > 0:
                w = get_param(gm, info.param)
                module = gm.get_submodule(prefix + info.module)
                dtype = getattr(torch, self.config.medium_dtype) if self.config.medium_dtype else w.dtype
                module.register_buffer("weight_medium", (w * compute_mask(w.abs(), s_w).to(w.dtype)).to(dtype))
                with gm.graph.inserting_before(node):
                    wm_node = gm.graph.get_attr(prefix + info.module + ".weight_medium")
                if "val" in weight_node.meta:
                    wm_node.meta["val"] = weight_node.meta["val"].new_empty(w.shape, dtype=dtype)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(op, (node.args[0], weight_node, wm_node, bias_node, 0.0, 0.0))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rewritten.append((new, info, stats, target))
        gm.recompile()
        targets = {new.name: target for new, _, _, target in rewritten}
        if self.config.allocation == "greedy" and rewritten:
            targets = self._greedy(gm, ctx, rewritten)
        per_param: dict[str, dict] = {}
        skipped = 0.0
        for new, info, stats, _ in rewritten:
            tiers = self.solve(stats, targets[new.name])
            _set_tiers(new, tiers)
            effective = tiers.effective_sparsity(s_w)
            new.meta[TIERS] = {**tiers.__dict__, "effective_sparsity": effective}
            per_param[info.param] = {"target": round(targets[new.name], 4), "t_high": tiers.t_high,
                                     "t_low": tiers.t_low, "p_high": round(tiers.p_high, 4),
                                     "p_medium": round(tiers.p_medium, 4), "p_low": round(tiers.p_low, 4),
                                     "effective_sparsity": round(effective, 4)}
            skipped += effective * info.in_features * info.out_features
            report.params_changed.append(info.param)
        gm.recompile()
        report.matches = len(per_param)
        report.details = {"allocation": self.config.allocation,
                          "effective_sparsity": skipped / total if total else 0.0, "per_param": per_param}
        return PassResult(gm, bool(per_param), report)

    def _greedy(self, gm, ctx, rewritten) -> dict[str, float]:
        """Per-linear targets from the block-wise greedy search; each layer keeps its MAC-weighted mean target."""
        if ctx.calibration is None:
            raise RecipeError("daws.allocation=greedy needs calibration data; pass calibration=...")
        knobs, budget, macs = [], {}, {}
        for new, info, stats, target in rewritten:
            if info.layer is None:
                raise RecipeError(f"daws.allocation=greedy works per transformer layer; {info.param} is in none — "
                                  "exclude it with daws.roles or an override of 0")
            m = info.in_features * info.out_features
            knobs.append(Knob(new.name, info.layer, m,
                              lambda node, s, stats=stats: _set_tiers(node, self.solve(stats, s)),
                              max_sparsity=self.config.max_sparsity))
            budget[info.layer] = budget.get(info.layer, 0.0) + target * m
            macs[info.layer] = macs.get(info.layer, 0) + m
        seqlen = ctx.calibration.shape[1]
        n_seq = max(1, min(ctx.calibration.shape[0], -(-self.config.greedy_tokens // seqlen)))
        return greedy_allocate(gm, knobs, {ly: budget[ly] / macs[ly] for ly in budget}, ctx.calibration[:n_seq],
                               ctx.batch_size, self.config.greedy_step, progress=ctx.progress)
