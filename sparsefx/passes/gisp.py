"""GISP — global iterative structured pruning — and its one-shot local baselines.

GISP (Wang et al. 2025, "From Local to Global: Revisiting Structured Pruning Paradigms for LLMs"):
  1. importance of a weight: first-order Taylor ``|w * dL/dw|``, the gradient averaged over calibration data for
     a target loss — language modelling (``objective: lm``) or a logistic margin between a correct and an
     incorrect continuation (``objective: margin``);
  2. a structure's score is the sum over its weights (``passes.structured.unit_scores``);
  3. block-wise normalisation makes heads and channels of every layer comparable (``normalize``):
       params  score / parameters of the unit      (estimated loss increase per parameter removed; default)
       block   score / parameters of its layer's attention or MLP block   (the GISP reference code's choice)
       none    the raw sum;
  4. one global ranking; the schedule removes ``sparsity / steps`` of the prunable parameters per step and
     recomputes gradients on the masked model before the next (``steps: 1`` is the one-shot global baseline);
  5. the removal order is recorded as a ``StructurePlan``: every level up to ``sparsity`` is a prefix of it.

Baselines (``structured_magnitude``, ``structured_wanda``): one-shot and local — each layer's attention and MLP
lose the same fraction of their units, ranked inside the layer by ``sum |w|`` or ``sum |w| * ||x_in||``.

Gradients are taken for the scored parameters only (every other parameter has ``requires_grad=False``); masked
units are zeroed in place during the search and restored afterwards, so the graph keeps its dense weights and the
plan alone says what to remove. ``lower_to_eager`` then shrinks the HF model to ``level``.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from .. import distributed
from ..errors import CalibrationError, RecipeError
from ..ir.annotate import annotated_linears
from ..ir.capture import get_param
from .base import Pass, PassContext, PassReport, PassResult
from .calibrate import STATS
from .config import PassConfig, check_fraction, register_pass
from .structured import PLAN, StructurePlan, restore_units, unit_scores, zero_units

log = logging.getLogger(__name__)

KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class StructuredConfig(PassConfig):
    """Shared fields of structured-removal passes.

    sparsity:  fraction of prunable parameters (attention and MLP weights) to remove, in [0, 1);
    level:     level the compressed model is physically pruned to (default: ``sparsity``); ``0`` keeps the dense
               weights and the whole ranking, so an artifact can be loaded at any level up to ``sparsity``;
    kinds:     which structures may be removed: attention (KV groups / heads) and/or mlp (channels);
    min_units: units every group keeps (>= 1: no layer loses all heads or all channels).
    """

    sparsity: float = 0.3
    level: float | None = None
    kinds: tuple[str, ...] = KINDS
    min_units: int = 1

    def validate(self) -> None:
        check_fraction(self.sparsity, f"{self.method}.sparsity")
        if self.level is not None:
            check_fraction(self.level, f"{self.method}.level")
            if self.level > self.sparsity:
                raise RecipeError(f"{self.method}.level ({self.level}) is above sparsity ({self.sparsity}); the "
                                  "ranking only reaches sparsity — raise sparsity or lower level")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise RecipeError(f"{self.method}.kinds: unknown kind(s) {bad or '(empty)'}; choose from {list(KINDS)}")
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 1:
            raise RecipeError(f"{self.method}.min_units must be an integer >= 1 (a layer keeps at least one head "
                              f"and one channel), got {self.min_units!r}")

    @property
    def apply_level(self) -> float:
        return self.sparsity if self.level is None else self.level


@dataclass(frozen=True)
class GispConfig(StructuredConfig):
    """GISP: global first-order scores, iterative schedule. Extra fields:

    steps:     scoring rounds between 0 and ``sparsity`` (1 = one-shot global);
    normalize: params | block | none (see the module docstring);
    objective: lm (calibration text) | margin (pairs of correct / incorrect continuations).
    """

    method = "gisp"
    steps: int = 6
    normalize: str = "params"
    objective: str = "lm"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise RecipeError(f"gisp.steps must be an integer in [1, 1000] (1 = one-shot), got {self.steps!r}")
        if self.normalize not in ("params", "block", "none"):
            raise RecipeError(f"gisp.normalize: expected params, block or none, got {self.normalize!r}")
        if self.objective not in ("lm", "margin"):
            raise RecipeError(f"gisp.objective: expected lm or margin, got {self.objective!r}")


@dataclass(frozen=True)
class StructuredMagnitudeConfig(StructuredConfig):
    method = "structured_magnitude"


@dataclass(frozen=True)
class StructuredWandaConfig(StructuredConfig):
    method = "structured_wanda"


def _eligible(plan: StructurePlan, config: StructuredConfig) -> list[int]:
    return [i for i, g in enumerate(plan.groups) if g.kind in config.kinds and g.n_units > config.min_units]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- objectives and gradients

def _lm_losses(gm: GraphModule, ctx: PassContext):
    """Yield (loss, weight) per micro-batch: next-token cross-entropy on the calibration tokens."""
    tokens = ctx.calibration
    if tokens is None or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise CalibrationError("gisp with objective lm needs calibration token ids [N, S>=2]; pass calibration= "
                               "to compress (data.calibration_batches)")
    n = tokens.shape[0]
    for i in range(0, n, ctx.batch_size):
        ids = tokens[i:i + ctx.batch_size]
        logits = gm(ids)                                        # [B, S, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        yield loss, ids.shape[0] / n


def _continuation_logprob(gm: GraphModule, prompt: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, cont])[None]                       # [1, P + C]
    logp = gm(ids)[0, prompt.numel() - 1:-1].float().log_softmax(-1)
    return logp.gather(-1, cont[:, None]).sum()


def _margin_losses(gm: GraphModule, ctx: PassContext):
    """Yield (loss, weight) per pair: ``softplus(log p(incorrect) - log p(correct))`` (logistic margin)."""
    pairs = ctx.pairs
    if not pairs:
        raise CalibrationError("gisp with objective margin needs pairs of continuations; pass --pairs FILE.jsonl "
                               "(lines of {\"prompt\", \"correct\", \"incorrect\"}) or PassContext(pairs=...)")
    for prompt, good, bad in pairs:
        margin = _continuation_logprob(gm, prompt, good) - _continuation_logprob(gm, prompt, bad)
        yield F.softplus(-margin), 1.0 / len(pairs)


OBJECTIVES = {"lm": _lm_losses, "margin": _margin_losses}


def objective_gradients(gm: GraphModule, params: list[str], ctx: PassContext,
                        objective: str = "lm") -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of the mean ``objective`` loss w.r.t. ``params`` (only these require grad); and the loss.

    Example:
        >>> grads, loss = objective_gradients(gm, ["model.layers.0.mlp.up_proj.weight"], ctx)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    flags = {p: p.requires_grad for p in gm.parameters()}
    wanted = {name: get_param(gm, name) for name in params}
    total = 0.0
    try:
        for p in flags:
            p.requires_grad_(False)
            p.grad = None
        for p in wanted.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for loss, weight in tqdm(OBJECTIVES[objective](gm, ctx), desc="gradients", disable=not ctx.progress,
                                     leave=False):
                (loss * weight).backward()
                total += float(loss.detach()) * weight
        grads = {name: p.grad for name, p in wanted.items()}
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    missing = [n for n, g in grads.items() if g is None]
    if missing:
        raise CalibrationError(f"no gradient reached {missing[:3]}; the objective does not depend on them")
    return _mean_over_processes(grads, total, ctx, objective)


def _mean_over_processes(grads: dict[str, torch.Tensor], loss: float, ctx: PassContext, objective: str):
    """Under ``torchrun`` each process averaged over its share of the data: weigh each share by its size and sum
    over processes, so every rank holds the gradient of the mean loss over all of the data."""
    if distributed.world_size() == 1:
        return grads, loss
    n_local = float(ctx.calibration.shape[0] if objective == "lm" else len(ctx.pairs))
    (n_all,) = distributed.all_reduce_floats([n_local])
    for g in grads.values():
        g.mul_(n_local / n_all)
    distributed.all_reduce_(list(grads.values()))
    (loss,) = distributed.all_reduce_floats([loss * n_local / n_all])
    return grads, loss


# ---------------------------------------------------------------- common skeleton

class _StructuredPass(Pass):
    """Build the structure plan of the graph, let :meth:`rank` fill its removal order, then record the level to
    apply. The graph keeps its dense weights: lowering reads the plan and removes the units physically."""

    requires = ("annotated",)
    provides = ("structured",)
    restructures = True

    def __init__(self, config: StructuredConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def rank(self, gm: GraphModule, ctx: PassContext, plan: StructurePlan, eligible: list[int],
             params: list[str]) -> dict:
        """Fill ``plan.order``; return extra report details."""
        raise NotImplementedError

    def run(self, gm, ctx):
        cfg = self.config
        plan = StructurePlan.for_graph(gm, method=cfg.method)
        eligible = _eligible(plan, cfg)
        params = sorted({m[0] for i in eligible for m in plan.groups[i].members})
        extra = self.rank(gm, ctx, plan, eligible, params)
        plan.target = plan.reachable(cfg.apply_level)
        gm.meta[PLAN] = plan
        report = PassReport(self.name, matches=len(eligible))
        report.details = {"sparsity_target": cfg.sparsity, "level": cfg.apply_level,
                          "prunable_params": plan.total_params, "scored_tensors": len(params),
                          "apply": plan.describe(plan.target), **extra}
        return PassResult(gm, True, report)


# ---------------------------------------------------------------- GISP

@register_pass(GispConfig)
class GispPass(_StructuredPass):
    """Rank attention KV groups and MLP channels globally by first-order scores, iteratively; record the plan."""

    name = "gisp"
    uses_calibration = True

    def normalized(self, plan: StructurePlan, i: int, scores: torch.Tensor) -> torch.Tensor:
        norm = self.config.normalize
        if norm == "params":
            return scores / plan.unit_params[i]
        if norm == "block":
            return scores / (plan.unit_params[i] * plan.groups[i].n_units)
        return scores

    def rank(self, gm, ctx, plan, eligible, params):
        cfg = self.config
        alive = {i: torch.ones(plan.groups[i].n_units, dtype=torch.bool) for i in eligible}
        removed_params, saved = 0, []
        t_start = time.perf_counter()
        try:
            for step in range(1, cfg.steps + 1):
                t0 = time.perf_counter()
                grads, loss = objective_gradients(gm, params, ctx, cfg.objective)
                with torch.no_grad():
                    elementwise = {p: (get_param(gm, p) * grads.pop(p)).abs_() for p in params}
                    scores = {i: self.normalized(plan, i, unit_scores(plan.groups[i], elementwise)) for i in eligible}
                del elementwise
                # candidates: alive units of every group beyond its guard, cheapest first
                cands = sorted((float(scores[i][u]), i, u) for i in eligible
                               for u in torch.nonzero(alive[i]).flatten().tolist())
                target = cfg.sparsity * step / cfg.steps * plan.total_params
                taken = self._take(plan, cands, alive, removed_params, target, cfg.min_units)
                for s, i, u in taken:
                    plan.order.append((i, u, s))
                    alive[i][u] = False
                    removed_params += plan.unit_params[i]
                for i in {i for _, i, _ in taken}:
                    units = torch.tensor([u for _, j, u in taken if j == i])
                    saved.append((i, units, zero_units(gm, plan.groups[i], units)))
                plan.steps.append({"step": step, "loss_before": round(loss, 6), "units_removed": len(taken),
                                   "level": round(removed_params / plan.total_params, 6),
                                   "seconds": round(time.perf_counter() - t0, 1)})
                # a round is a forward + backward over all the calibration text: minutes on CPU, one line each
                log.info("gisp round %d/%d: loss %.4f, %d units removed, level %.3f (%.0f s)", step, cfg.steps,
                         loss, len(taken), removed_params / plan.total_params, time.perf_counter() - t0)
            plan.exact_until = removed_params / plan.total_params
            # beyond the target: what is left, ranked by the last round's scores (guards still apply)
            left = [(s, i, u) for s, i, u in cands if alive[i][u]]
            plan.order += [(i, u, s) for s, i, u in self._take(plan, left, alive, 0, float("inf"), cfg.min_units)]
        finally:
            for i, units, old in reversed(saved):     # the graph keeps its dense weights; the plan says what goes
                restore_units(gm, plan.groups[i], units, old)
        grad_bytes = sum(get_param(gm, p).numel() * get_param(gm, p).element_size() for p in params)
        return {"reached": round(plan.exact_until, 6), "steps": plan.steps,
                "seconds": round(time.perf_counter() - t_start, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
                "grad_mb": round(grad_bytes / 2**20, 1)}

    @staticmethod
    def _take(plan, cands, alive, removed, target, min_units):
        """From ``cands`` (sorted ascending), the units to remove until ``removed`` reaches ``target`` parameters,
        never leaving a group with fewer than ``min_units`` units."""
        left = {i: int(a.sum()) for i, a in alive.items()}
        taken = []
        for s, i, u in cands:
            if removed >= target:
                break
            if left[i] <= min_units:
                continue
            taken.append((s, i, u))
            left[i] -= 1
            removed += plan.unit_params[i]
        return taken


# ---------------------------------------------------------------- one-shot local baselines

class _LocalPass(_StructuredPass):
    """Each group loses the same fraction of its units, lowest ``score`` first; one-shot, no gradients."""

    def elementwise(self, gm: GraphModule, params: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def rank(self, gm, ctx, plan, eligible, params):
        elementwise = self.elementwise(gm, params)
        keyed = []
        for i in eligible:
            g = plan.groups[i]
            scores = unit_scores(g, elementwise)
            ranked = torch.argsort(scores, stable=True).tolist()[:g.n_units - self.config.min_units]
            # the r-th weakest unit of a group leaves when the level reaches (r + 1) / n_units: uniform per layer
            keyed += [((r + 1) / g.n_units, i, u, float(scores[u])) for r, u in enumerate(ranked)]
        plan.order = [(i, u, s) for _, i, u, s in sorted(keyed)]
        return {}


@register_pass(StructuredMagnitudeConfig)
class StructuredMagnitudePass(_LocalPass):
    """Local one-shot baseline: a unit's score is the sum of ``|w|`` over its weights."""

    name = "structured_magnitude"

    def elementwise(self, gm, params):
        return {p: get_param(gm, p).abs() for p in params}


@register_pass(StructuredWandaConfig)
class StructuredWandaPass(_LocalPass):
    """Local one-shot baseline: a unit's score is the sum of ``|w_ij| * ||x_j||`` (Wanda) over its weights."""

    name = "structured_wanda"
    requires = ("annotated", "calibrated")

    def elementwise(self, gm, params):
        norms = {}
        for node, info in annotated_linears(gm):
            stats = node.meta.get(STATS)
            if info.param in params:
                if stats is None:
                    raise RecipeError(f"structured_wanda needs activation statistics for {info.param}; run the "
                                      "calibrate pass first")
                norms[info.param] = stats.channel_l2
        out = {}
        for p in params:
            w = get_param(gm, p).abs()
            out[p] = w * norms[p].to(w)[None, :] if p in norms else w   # biases: |b|
        return out
