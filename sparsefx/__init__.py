"""sparsefx: a compression compiler for large language models.

    >>> import sparsefx
    >>> recipe = sparsefx.Recipe.from_yaml("passes: [{method: wanda, sparsity: 0.5}]")
    >>> model, tok = sparsefx.load_model("smollm2")                      # doctest: +SKIP
    >>> sparsefx.compress(model, recipe, calibration=sparsefx.data.calibration_batches(tok))  # doctest: +SKIP

Names are resolved lazily: importing sparsefx imports neither transformers nor the passes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "sparsefx.artifact", "load_artifact": "sparsefx.artifact", "save_artifact": "sparsefx.artifact",
    "compress": "sparsefx.pipeline", "CompressionResult": "sparsefx.pipeline",
    "Recipe": "sparsefx.passes.config", "load_model": "sparsefx.models", "tiny_model": "sparsefx.models",
    "evaluate": "sparsefx.eval", "capture": "sparsefx.ir", "verify": "sparsefx.ir",
}
_SUBMODULES = {"data", "models", "ir", "passes", "codegen", "eval", "artifact", "pipeline", "errors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"sparsefx.{name}")
    raise AttributeError(f"module 'sparsefx' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
