"""The standalone pipeline: capture -> annotate -> calibrate -> transform -> lower, driven by a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .codegen.eager import lower_to_eager
from .ir.capture import capture
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


def build_pipeline(recipe: Recipe) -> PassManager:
    """The pass list for ``recipe``: annotate, calibrate if any pass needs it, then the recipe's passes."""
    built = [build_pass(c) for c in recipe.passes]
    passes = [AnnotatePass()]
    if any("calibrated" in p.requires for p in built):
        passes.append(CalibratePass())
    return PassManager(passes + built)


def compress(model: nn.Module, recipe: Recipe, calibration: torch.Tensor | None = None,
             progress: bool = True) -> CompressionResult:
    """Compress ``model`` in place according to ``recipe``.

    ``calibration``: token ids ``[N, S]`` (``data.calibration_batches``), needed by recipes with Wanda & co.

    Example:
        >>> recipe = Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]")
        >>> result = compress(tiny_model("llama"), recipe)  # doctest: +SKIP
    """
    pm = build_pipeline(recipe)
    pm.check_order()
    gm = capture(model)
    ctx = PassContext(calibration=calibration, batch_size=recipe.calibration.batch_size, progress=progress)
    gm, reports = pm.run(gm, ctx)
    lower_to_eager(gm, model)
    return CompressionResult(model, gm, reports)
