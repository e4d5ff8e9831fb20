"""The pass contract and the pass manager.

A pass is an object with ``name``, the pipeline stages it ``requires`` and ``provides``, and
``run(gm, ctx) -> PassResult``. ``PassManager`` runs an ordered list, refuses an order in which a pass runs before
a stage it needs, verifies the IR after every pass (so an error names the pass that broke the graph), and adds
the node-level diff to each pass's report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from ..errors import RecipeError, SparsefxError
from ..ir import annotate, annotated_linears, build_dependency_graph
from ..ir.meta import STAGES
from ..ir.verify import IRError, verify


@dataclass
class PassReport:
    """What one pass changed. ``details`` holds pass-specific, JSON-serialisable figures."""

    name: str
    modified: bool = False
    matches: int = 0
    nodes_added: list[str] = field(default_factory=list)
    nodes_removed: list[str] = field(default_factory=list)
    params_changed: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    report: PassReport


@dataclass
class PassContext:
    """Inputs passes may need beyond the graph. ``calibration``: token ids ``[N, S]``; ``pairs``: token ids
    ``(prompt, correct, incorrect)`` for margin objectives (``data.load_pairs``)."""

    calibration: torch.Tensor | None = None
    batch_size: int = 4
    progress: bool = True
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


class Pass:
    """Base class of sparsefx passes; subclasses implement ``run``.

    Example:
        >>> class Nop(Pass):
        ...     name = "nop"
        ...     def run(self, gm, ctx):
        ...         return PassResult(gm, False, PassReport(self.name))
    """

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    # True for passes whose result changes parameter shapes (structured removal): the pipeline lowers it onto the
    # model and captures again before the next pass
    restructures: ClassVar[bool] = False
    # True for passes that feed calibration batches through the model themselves (GPTQ's and DAM's Gram matrices,
    # GISP's gradients, CATS's observers) instead of reading the statistics the calibrate pass leaves ("calibrated"
    # in ``requires``); see ``needs_calibration``
    uses_calibration: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        """Whether this pass needs calibration text: it reads the calibrate pass's statistics or runs batches
        itself. The one definition that recipes, the CLI and both pipelines ask."""
        return self.uses_calibration or "calibrated" in self.requires

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run(gm, ctx or PassContext())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassError(SparsefxError):
    """A pass failed or broke the IR; the message names the pass."""


class PassManager:
    """Run passes in order with ordering checks and verification after each.

    Example:
        >>> pm = PassManager([AnnotatePass(), MagnitudePass(MagnitudeConfig(sparsity=0.5))])  # doctest: +SKIP
        >>> gm, reports = pm.run(gm)  # doctest: +SKIP
    """

    def __init__(self, passes: list[Pass], verify_each: bool = True, propagate: bool = True):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.propagate = propagate

    def check_order(self, done: tuple[str, ...] = ()) -> None:
        """Raise ``RecipeError`` if some pass needs a stage that no earlier pass provides."""
        have = set(done)
        for p in self.passes:
            missing = [s for s in p.requires if s not in have]
            if missing:
                raise RecipeError(f"pass {p.name!r} requires stage(s) {missing} but no earlier pass provides them; "
                                  f"order: {[q.name for q in self.passes]}")
            have.update(p.provides)

    def run(self, gm: GraphModule, ctx: PassContext | None = None) -> tuple[GraphModule, list[PassReport]]:
        ctx = ctx or PassContext()
        stages = gm.meta.setdefault(STAGES, [])
        self.check_order(tuple(stages))
        reports = []
        for p in self.passes:
            before = {n.name for n in gm.graph.nodes}
            t0 = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except SparsefxError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name!r} failed: {type(exc).__name__}: {exc}") from exc
            gm, report = result.graph_module, result.report
            report.seconds = time.perf_counter() - t0
            after = {n.name for n in gm.graph.nodes}
            report.nodes_added = sorted(after - before)
            report.nodes_removed = sorted(before - after)
            report.modified = result.modified
            if self.verify_each:
                try:
                    verify(gm, propagate=self.propagate)
                except IRError as exc:
                    raise PassError(f"IR invalid after pass {p.name!r}: {exc}") from exc
            gm.meta[STAGES] = stages = [*stages, *p.provides]
            reports.append(report)
        return gm, reports


class AnnotatePass(Pass):
    """Annotate linears with parameter, layer and role; build the dependency graph."""

    name = "annotate"
    provides = ("annotated",)

    def run(self, gm, ctx):
        layers = annotate(gm)
        dep = build_dependency_graph(gm)
        roles: dict[str, int] = {}
        for _, info in annotated_linears(gm):
            roles[info.role] = roles.get(info.role, 0) + 1
        details = {"layers": len(layers), "roles": roles, "coupled_axes": dep.number_of_nodes()}
        return PassResult(gm, False, PassReport(self.name, matches=sum(roles.values()), details=details))


# Merging the reports of one pass run on several parts of a model (the sequential pipeline's blocks and LM head):
# counts add up, per-parameter tables join, and ratios are recomputed from their summed parts.
_SUMMED = {"macs_skipped", "macs_total", "weights_zeroed", "weights_in_scope", "bytes", "dense_fp16_bytes",
           "tokens", "seconds"}
_RATIOS = {"sparsity": ("weights_zeroed", "weights_in_scope", 1.0),
           "effective_sparsity": ("macs_skipped", "macs_total", 1.0),
           "bits_per_weight": ("bytes", "dense_fp16_bytes", 16.0)}   # bytes * 8 / (fp16 bytes / 2)


def _merge_values(key: str, values: list):
    values = [v for v in values if v is not None]
    if not values:
        return None
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _merge_values(k, [v.get(k) for v in values]) for k in keys}
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        if key in _SUMMED or all(isinstance(v, int) for v in values):
            return sum(values)
        return values[0] if all(v == values[0] for v in values) else sum(values) / len(values)
    return values[0] if all(v == values[0] for v in values) else values


def merge_reports(reports: list[PassReport]) -> PassReport:
    """One report for one pass that ran on several graphs (one per decoder block, the LM head): matches and
    counts summed, per-parameter tables joined, ``sparsity`` / ``effective_sparsity`` / ``bits_per_weight``
    recomputed from the summed parts they are ratios of, other figures kept when equal (else averaged).

    Example:
        >>> merge_reports([PassReport("m", matches=2), PassReport("m", matches=3)]).matches
        5
    """
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    out = PassReport(reports[0].name, modified=any(r.modified for r in reports),
                     matches=sum(r.matches for r in reports), seconds=sum(r.seconds for r in reports))
    for attr in ("nodes_added", "nodes_removed", "params_changed", "params_removed"):
        setattr(out, attr, [x for r in reports for x in getattr(r, attr)])
    details = _merge_values("details", [r.details for r in reports]) or {}
    for key, (num, den, scale) in _RATIOS.items():
        if key in details and num in details and den in details:
            details[key] = details[num] * scale / details[den] if details[den] else 0.0
    out.details = details
    return out
