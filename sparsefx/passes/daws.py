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

``medium_tiers`` (a list of weight sparsities, e.g. ``[0.25, 0.5, 0.75]``) replaces that shape by one derived from
"keep the large products": the oracle that keeps x_i * W_ji iff |x_i| * |W_ji| >= tau gives channel i the share
P(|W| >= tau / |x_i|) of the weights, over the whole matrix. Rounding that share to the nearest of the levels
(1, 1 - medium_tiers..., 0) routes each channel by |x| against thresholds tau / w_k, where w_k is the |W| quantile
at the midpoint between two levels; each medium tier keeps the largest |W| of the whole matrix at its level
(nested masks), and tau is bisected per linear so the predicted effective sparsity meets the target. One medium
tier still lowers to ``tiered_linear``; more to ``sparsefx::multitier_linear``.

``layout: banded`` stores those nested tiers in one fp16 matrix whose low mantissa bits hold each weight's band
(``ops/routed/format.py``) and lowers to ``sparsefx::banded_linear``: one matrix in memory and one stream for the
decode kernel, at about bf16's precision for every tier (the full one included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..ir.annotate import ROLES
from ..ir.capture import get_param
from ..ir.meta import TIERS, param_prefix
from ..ops import REGISTRY, spec_for_target
from ..ops.routed.args import BandedArgs, MultitierArgs, TieredArgs
from ..ops.routed.format import MAX_MEDIUMS, pack_bands
from .allocate import Knob, greedy_allocate
from .base import Pass, PassReport, PassResult
from .calibrate import ActStats
from .config import PassConfig, check_fraction, normalize_overrides, override_for, register_pass
from .masks import compute_mask
from .rewrite import calibrated_stats, dense_linears, replace_linear

ALLOCATIONS = ("uniform", "greedy")
MEDIUM_DTYPES = (None, "float16", "bfloat16")
LAYOUTS = ("separate", "banded")


@dataclass(frozen=True)
class DawsConfig(PassConfig):
    """sparsity: target effective sparsity; medium_fraction: share of channels in the medium tier;
    medium_weight_sparsity: magnitude sparsity of the medium tier's weights; roles/overrides as for masks
    (overrides map a glob over parameter names to an effective sparsity); allocation: ``uniform`` gives every
    linear its target, ``greedy`` redistributes each block's budget by the block-output-error search of
    ``passes.allocate``; medium_dtype: storage dtype of the medium tier's weights (``None``: the weight's own;
    ``float16`` halves the bytes the CPU decode kernel reads per medium channel, math stays in the input's dtype);
    medium_tiers: weight sparsities of one or more medium tiers, rising (e.g. ``[0.25, 0.5, 0.75]``) — when given,
    the tiers follow from "keep the large products" (module docstring) and ``medium_fraction`` /
    ``medium_weight_sparsity`` are not used; layout: ``separate`` stores one more copy of the weights per medium
    tier, ``banded`` (with ``medium_tiers``, at most three) all tiers in one fp16 matrix (``ops/routed/format.py``)."""

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
    medium_tiers: tuple[float, ...] = ()  # weight sparsity per medium tier, rising; set: product-consistent routing
    layout: str = "separate"           # "separate" (a copy per medium tier) or "banded" (one fp16 matrix)

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
        tiers = self.medium_tiers
        if isinstance(tiers, (list, tuple)):
            tiers = tuple(tiers)
            object.__setattr__(self, "medium_tiers", tiers)
        if (not isinstance(tiers, tuple) or any(isinstance(t, bool) or not isinstance(t, (int, float))
                                                or not 0.0 < t < 1.0 for t in tiers)
                or any(a >= b for a, b in zip(tiers, tiers[1:]))):
            raise RecipeError(f"daws.medium_tiers: expected weight sparsities in (0, 1), strictly rising (the first "
                              f"medium tier, just below the high one, is pruned least), e.g. [0.25, 0.5, 0.75]; "
                              f"got {self.medium_tiers!r}")
        if self.layout not in LAYOUTS:
            raise RecipeError(f"daws.layout: expected one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "banded":
            if not 1 <= len(tiers) <= MAX_MEDIUMS:
                raise RecipeError(f"daws.layout: banded needs daws.medium_tiers with 1 to {MAX_MEDIUMS} tiers (two "
                                  f"band bits per weight), got {list(tiers)}; use layout: separate for more")
            if self.medium_dtype not in (None, "float16"):
                raise RecipeError(f"daws.layout: banded stores every tier in fp16; daws.medium_dtype "
                                  f"{self.medium_dtype!r} does not apply (leave it unset)")
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
        >>> tiers = solve_tiers(node.meta[STATS], 0.5, 0.2, 0.5)  # doctest: +SKIP
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


@dataclass(frozen=True)
class Levels:
    """Routing of one linear into tiers 0..n: tier 0 (|x| >= thresholds[0]) keeps all weights, tier k
    (thresholds[k] <= |x| < thresholds[k-1]) keeps the share ``densities[k]`` of them, the last tier
    (|x| < thresholds[-1]) is dropped. ``fractions[k]``: predicted share of |x| in tier k (calibration histogram)."""

    thresholds: tuple[float, ...]     # descending
    fractions: tuple[float, ...]      # len(thresholds) + 1
    densities: tuple[float, ...]      # len(thresholds) + 1: 1, medium densities..., 0

    @property
    def effective_sparsity(self) -> float:
        return sum(p * (1.0 - d) for p, d in zip(self.fractions, self.densities))

    @classmethod
    def from_tiers(cls, tiers: Tiers, medium_weight_sparsity: float) -> "Levels":
        return cls((tiers.t_high, tiers.t_low), (tiers.p_high, tiers.p_medium, tiers.p_low),
                   (1.0, 1.0 - medium_weight_sparsity, 0.0))

    def details(self) -> dict:
        if len(self.thresholds) == 2:  # the three tiers of tiered_linear, by name
            return {"t_high": self.thresholds[0], "t_low": self.thresholds[1], "p_high": round(self.fractions[0], 4),
                    "p_medium": round(self.fractions[1], 4), "p_low": round(self.fractions[2], 4)}
        return {"thresholds": list(self.thresholds), "fractions": [round(p, 4) for p in self.fractions],
                "densities": [round(d, 4) for d in self.densities]}


def magnitude_quantiles(w_abs: torch.Tensor, densities) -> list[float]:
    """For each share ``d``: the |W| value such that the ``round(d * numel)`` largest of ``w_abs`` (over the whole
    matrix) lie at or above it.

    Example:
        >>> magnitude_quantiles(torch.tensor([1., 2., 3., 4.]), [0.5, 0.25])
        [3.0, 4.0]
    """
    flat = w_abs.detach().flatten().float()
    n = flat.numel()
    return [float(flat.kthvalue(min(n, max(1, n - int(round(d * n)) + 1))).values) for d in densities]


def solve_levels(stats: ActStats, boundary_weights, densities, sparsity: float) -> Levels:
    """Thresholds for product-consistent routing (module docstring) at ``sparsity`` effective sparsity.

    ``densities``: the tiers' weight densities (1, ..., 0), descending; ``boundary_weights[k]``: the |W| quantile at
    the midpoint of densities k and k + 1 (``magnitude_quantiles``). Channel |x| reaches tier k's boundary when
    |x| * boundary_weights[k] >= tau; tau is bisected (in log space) to the least value whose predicted effective
    sparsity reaches ``sparsity``.

    Example:
        >>> levels = solve_levels(stats, [0.01, 0.03, 0.08], (1, 0.67, 0.33, 0), 0.5)  # doctest: +SKIP
    """
    n = len(boundary_weights)

    def route(log_tau: float) -> Levels:
        ts = tuple(10.0 ** log_tau / max(w, 1e-30) for w in boundary_weights)
        below = [stats.fraction_below(t) for t in ts]           # non-increasing
        fractions = (1.0 - below[0], *(below[k - 1] - below[k] for k in range(1, n)), below[-1])
        return Levels(ts, fractions, tuple(densities))

    if sparsity <= 0.0:
        return Levels((0.0,) * n, (1.0,) + (0.0,) * n, tuple(densities))
    lo, hi = -40.0, 40.0   # |x| and |W| lie within 1e-20 .. 1e20 of each other
    for _ in range(64):
        mid = (lo + hi) / 2
        if route(mid).effective_sparsity >= sparsity:
            hi = mid
        else:
            lo = mid
    return route(hi)


def _set_levels(node, levels: Levels) -> None:
    spec_for_target(node.target).args.from_node(node).set_thresholds(node, levels.thresholds)


@register_pass(DawsConfig)
class DawsPass(Pass):
    """Rewrite each selected linear into ``sparsefx::tiered_linear`` (or ``multitier_linear``) with calibrated
    thresholds."""

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

    def _add_medium(self, gm, prefix: str, info, weight_node, w: torch.Tensor, keep: torch.Tensor, name: str):
        """Register ``w * keep`` (in ``medium_dtype``) on the linear's module as buffer ``name``; its get_attr."""
        module = gm.get_submodule(prefix + info.module)
        dtype = getattr(torch, self.config.medium_dtype) if self.config.medium_dtype else w.dtype
        module.register_buffer(name, (w * keep.to(w.dtype)).to(dtype))
        node = gm.graph.get_attr(prefix + info.module + "." + name)
        if "val" in weight_node.meta:
            node.meta["val"] = weight_node.meta["val"].new_empty(w.shape, dtype=dtype)
        return node

    def _rewrite(self, gm, prefix: str, node, info, stats):
        """Replace the linear ``node``; return the new node and ``solver(sparsity) -> Levels`` for it."""
        c = self.config
        weight_node = node.args[1]
        bias_node = node.args[2] if len(node.args) > 2 else None
        w = get_param(gm, info.param)
        if c.medium_tiers:
            w_abs = w.abs()
            nominal = (1.0, *(1.0 - t for t in c.medium_tiers), 0.0)
            mids = [(a + b) / 2 for a, b in zip(nominal, nominal[1:])]
            quantiles = magnitude_quantiles(w_abs, mids + list(nominal[1:-1]))   # one flattened copy per linear
            boundary_weights, cuts = quantiles[:len(mids)], quantiles[len(mids):]
            if c.layout == "banded":
                return self._rewrite_banded(gm, node, info, w, w_abs, boundary_weights, cuts, stats)
            names = ["weight_medium"] if len(cuts) == 1 else [f"weight_medium_{k}" for k in range(len(cuts))]
            mediums, densities = [], [1.0]
            with gm.graph.inserting_before(node):
                for cut, name in zip(cuts, names):
                    keep = w_abs >= cut
                    densities.append(float(keep.float().mean()))
                    mediums.append(self._add_medium(gm, prefix, info, weight_node, w, keep, name))
            densities = tuple(densities) + (0.0,)

            def solver(s):
                return solve_levels(stats, boundary_weights, densities, s)

            if len(mediums) == 1:
                view = TieredArgs(node.args[0], weight_node, mediums[0], bias_node, 0.0, 0.0)
            else:
                view = MultitierArgs(node.args[0], weight_node, mediums, bias_node, [0.0] * (len(cuts) + 1))
        else:
            s_w = c.medium_weight_sparsity
            wm_node = weight_node  # no medium tier (TEAL-style): t_low == t_high, the medium weights are never read
            if c.medium_fraction > 0:
                with gm.graph.inserting_before(node):
                    wm_node = self._add_medium(gm, prefix, info, weight_node, w, compute_mask(w.abs(), s_w),
                                               "weight_medium")

            def solver(s):
                return Levels.from_tiers(self.solve(stats, s), s_w)

            view = TieredArgs(node.args[0], weight_node, wm_node, bias_node, 0.0, 0.0)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(REGISTRY[view.op_name].op, view.as_args())
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return new, solver

    def _rewrite_banded(self, gm, node, info, w, w_abs, boundary_weights, cuts, stats):
        """``layout: banded``: replace ``node`` by ``banded_linear`` over one fp16 matrix holding every tier."""
        try:
            banded = pack_bands(w, cuts)
        except ValueError as exc:
            raise RecipeError(f"daws on {info.param}: {exc}") from None
        densities = (1.0, *(float((w_abs >= cut).float().mean()) for cut in cuts), 0.0)
        new = replace_linear(gm, node, info, BandedArgs, {"weight": ("weight_banded", banded)},
                             thresholds=[0.0] * (len(cuts) + 1))

        def solver(s):
            return solve_levels(stats, boundary_weights, densities, s)

        return new, solver

    @torch.no_grad()
    def run(self, gm, ctx):
        prefix = param_prefix(gm)
        report = PassReport(self.name)
        rewritten = []  # (new node, info, solver, target)
        total = 0
        for node, info in dense_linears(gm, self.config.roles):
            target = self.config.target_for(info.param)
            total += info.in_features * info.out_features
            if target == 0.0:
                continue
            stats = calibrated_stats(node, info, "daws")
            new, solver = self._rewrite(gm, prefix, node, info, stats)
            rewritten.append((new, info, solver, target))
        gm.recompile()
        targets = {new.name: target for new, _, _, target in rewritten}
        if self.config.allocation == "greedy" and rewritten:
            targets = self._greedy(gm, ctx, rewritten)
        per_param: dict[str, dict] = {}
        skipped = 0.0
        for new, info, solver, _ in rewritten:
            levels = solver(targets[new.name])
            _set_levels(new, levels)
            effective = levels.effective_sparsity
            new.meta[TIERS] = {**levels.details(), "effective_sparsity": effective}
            per_param[info.param] = {"target": round(targets[new.name], 4), **levels.details(),
                                     "effective_sparsity": round(effective, 4)}
            skipped += effective * info.in_features * info.out_features
            report.params_changed.append(info.param)
        gm.recompile()
        report.matches = len(per_param)
        report.details = {"allocation": self.config.allocation,
                          "effective_sparsity": skipped / total if total else 0.0, "per_param": per_param,
                          "macs_skipped": skipped, "macs_total": total}
        if self.config.layout == "banded" and per_param:
            report.details["bits_per_weight"] = 16.0    # one fp16 matrix holds every tier of a rewritten linear
        return PassResult(gm, bool(per_param), report)

    def _greedy(self, gm, ctx, rewritten) -> dict[str, float]:
        """Per-linear targets from the block-wise greedy search; each layer keeps its MAC-weighted mean target."""
        if ctx.calibration is None:
            raise RecipeError("daws.allocation=greedy needs calibration data; pass calibration=...")
        knobs, budget, macs = [], {}, {}
        for new, info, solver, target in rewritten:
            if info.layer is None:
                raise RecipeError(f"daws.allocation=greedy works per transformer layer; {info.param} is in none — "
                                  "exclude it with daws.roles or an override of 0")
            m = info.in_features * info.out_features
            knobs.append(Knob(new.name, info.layer, m,
                              lambda node, s, solver=solver: _set_levels(node, solver(s)),
                              max_sparsity=self.config.max_sparsity))
            budget[info.layer] = budget.get(info.layer, 0.0) + target * m
            macs[info.layer] = macs.get(info.layer, 0) + m
        seqlen = ctx.calibration.shape[1]
        n_seq = max(1, min(ctx.calibration.shape[0], -(-self.config.greedy_tokens // seqlen)))
        return greedy_allocate(gm, knobs, {ly: budget[ly] / macs[ly] for ly in budget}, ctx.calibration[:n_seq],
                               ctx.batch_size, self.config.greedy_step, progress=ctx.progress)
