"""What every export shares: the artifact's compressed modules that an engine format cannot hold, refused by name."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ExportError
from ..sequential.blocks import text_config

__all__ = ["ROUTED", "head_tied", "refuse_structured", "refuse_unsupported", "text_config"]

ROUTED = {"tiered_linear", "multitier_linear", "banded_linear", "thresholded_act", "sparse_lowrank_linear"}


def refuse_unsupported(name: str, module: nn.Module, fmt: str) -> None:
    """Raise ``ExportError`` naming ``name`` if ``module``'s kind has no ``fmt`` equivalent (activation routing,
    DAM's low-rank correction, anything unknown); return for ``quant_linear`` and ``nm_linear``."""
    kind = getattr(module, "kind", None)
    if kind in ("quant_linear", "nm_linear"):
        return
    if kind in ROUTED:
        raise ExportError(f"{name} is a {kind} (activation routing: which channels a token reads is decided per "
                          f"token), which {fmt} cannot represent; export an artifact of a weight-only recipe "
                          "(wanda, magnitude, N:M, rtn, gptq) instead")
    if kind == "lowrank_quant_linear":
        raise ExportError(f"{name} is DAM's quantized weight plus a low-rank correction, which {fmt} has no type "
                          "for; export an rtn or gptq artifact instead")
    raise ExportError(f"{name}: compressed kind {kind!r} has no {fmt} export")


def refuse_structured(folder: Path, fmt: str) -> None:
    if (folder / "structure.json").is_file():
        raise ExportError(f"{folder} was pruned structurally (structure.json): its layers keep different numbers of "
                          f"heads and channels, which the {fmt} export does not write (the engines read one head "
                          "count for every layer); export a weight-mask or quantized artifact instead")


def head_tied(model: nn.Module) -> bool:
    """Whether the model's output head *is* its input embedding (tied, and still the same tensor): then the formats
    store the embedding once and the engine ties it back. A head quantized apart from the embeddings is not tied."""
    out = model.get_output_embeddings()
    return bool(getattr(text_config(model), "tie_word_embeddings", False)) and out is not None and \
        getattr(out, "weight", None) is model.get_input_embeddings().weight
