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
from .passes.calibrate import STATS, CalibratePass
from .passes.config import Recipe, build_pass


@dataclass
class CompressionResult:
    """The compressed HF model (same object as the input), its IR (``None`` after a sequential run, which
    captures one block at a time), one report per pass and, from a sequential run, its statistics and timings."""

    model: nn.Module
    graph_module: torch.fx.GraphModule | None
    reports: list[PassReport] = field(default_factory=list)
    sequential: dict | None = None
    block_stats: dict | None = None

    @property
    def stats(self) -> dict:
        """Calibration statistics by input (what ``save_artifact(stats=...)`` stores)."""
        if self.graph_module is not None:
            return self.graph_module.meta.get(STATS) or {}
        return self.block_stats or {}

    def reported(self, key: str):
        """What the last pass that reports ``key`` in its details says (``None`` if none does): activation
        passes report ``effective_sparsity``, quantizing passes ``bits_per_weight``, DAM ``orders``."""
        return last_reported([r.details for r in self.reports], key)

    def report_dict(self) -> dict:
        out = {"passes": [r.to_dict() for r in self.reports]}
        if self.sequential is not None:
            out["sequential"] = self.sequential
        return out


def last_reported(details: list[dict], key: str):
    """The value of ``key`` in the last of the passes' ``details`` that has one, else ``None`` (also for a saved
    artifact's ``report.json``: ``[p["details"] for p in report["passes"]]``)."""
    return next((d[key] for d in reversed(details) if d.get(key) is not None), None)


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
             progress: bool = True, pairs: list | None = None, sequential: bool = False, device=None,
             calib_inputs: str = "compressed") -> CompressionResult:
    """Compress ``model`` in place according to ``recipe``.

    ``calibration``: token ids ``[N, S]`` (``data.calibration_batches``), needed by recipes with Wanda & co.;
    ``pairs``: ``(prompt, correct, incorrect)`` token ids for GISP's margin objective (``data.load_pairs``).
    ``sequential``: one decoder block at a time (``sequential.compress_blocks``), each on ``device`` for its turn
    (a GPU holds one block; the model stays where it is) and calibrated on ``calib_inputs`` (``compressed``: the
    outputs of the blocks compressed before it; ``dense``: the dense model's, as a whole-model run). A checkpoint
    larger than memory is compressed from its files with ``sequential.compress_checkpoint``.

    Example:
        >>> recipe = Recipe.from_yaml("passes: [{method: magnitude, sparsity: 0.5}]")
        >>> result = compress(tiny_model("llama"), recipe)  # doctest: +SKIP
    """
    if sequential:
        from .sequential import ModelSource, compress_blocks   # lazy: sequential builds on this module

        res = compress_blocks(ModelSource(model, device), recipe, calibration, inputs=calib_inputs,
                              progress=progress, pairs=pairs)
        return CompressionResult(model, None, res.reports, res.info, res.stats)
    if device is not None:
        model.to(device)
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
