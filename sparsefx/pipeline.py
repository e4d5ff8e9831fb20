"""The standalone pipeline: capture -> annotate -> calibrate -> transform -> lower, driven by a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .codegen.eager import lower_to_eager
from .ir.annotate import annotate
from .ir.capture import capture
from .ir.verify import verify
from .passes.base import AnnotatePass, PassContext, PassManager, PassReport
from .passes.calibrate import CalibratePass
from .passes.config import Recipe, build_pass


@dataclass
class CompressionResult:
    """The compressed HF model (same object as the input), its IR, and one report per pass."""

    model: nn.Module
    graph_module: torch.fx.GraphModule
    reports: list[PassReport] = field(default_factory=list)

    def report_dict(self) -> dict:
        return {"passes": [r.to_dict() for r in self.reports]}


def _stages(recipe: Recipe) -> list[list]:
    """The recipe's passes, cut after every pass that changes parameter shapes (structured removal)."""
    stages: list[list] = [[]]
    for config in recipe.passes:
        p = build_pass(config)
        stages[-1].append(p)
        if p.restructures:
            stages.append([])
    return [s for s in stages if s]


def _manager(passes: list) -> PassManager:
    """Annotate, calibrate if any of ``passes`` needs it, then ``passes``."""
    head = [AnnotatePass()]
    if any("calibrated" in p.requires for p in passes):
        head.append(CalibratePass())
    return PassManager(head + passes)


def build_pipeline(recipe: Recipe) -> list[PassManager]:
    """One pass manager per stage of ``recipe``: a structured-removal pass ends a stage, because the model is
    physically shrunk and captured again before the next pass runs."""
    return [_manager(stage) for stage in _stages(recipe)]


def compress(model: nn.Module, recipe: Recipe, calibration: torch.Tensor | None = None,
             progress: bool = True, pairs: list | None = None) -> CompressionResult:
    """Compress ``model`` in place according to ``recipe``.

    ``calibration``: token ids ``[N, S]`` (``data.calibration_batches``), needed by recipes with Wanda & co.;
    ``pairs``: ``(prompt, correct, incorrect)`` token ids for GISP's margin objective (``data.load_pairs``).

    Example:
        >>> recipe = Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]")
        >>> result = compress(tiny_model("llama"), recipe)  # doctest: +SKIP
    """
    managers = build_pipeline(recipe)
    for pm in managers:
        pm.check_order()
    ctx = PassContext(calibration=calibration, batch_size=recipe.calibration.batch_size, progress=progress,
                      pairs=pairs)
    gm, reports = capture(model), []
    for pm in managers:
        gm, stage_reports = pm.run(gm, ctx)
        reports += stage_reports
        lower_to_eager(gm, model)
        if pm.passes[-1].restructures:
            # the model is smaller now: capture it again, so what follows (and the caller) sees the real shapes
            gm = capture(model)
            annotate(gm)
            verify(gm)
    return CompressionResult(model, gm, reports)
