"""Passes over the IR: the pass contract, the pass manager, configs/recipes, calibration and transforms.

Transform modules (``masks``, ...) register their configs when first looked up by method name, not at import.
"""

from .base import AnnotatePass, Pass, PassContext, PassError, PassManager, PassReport, PassResult
from .config import PassConfig, Recipe, build_pass, config_from_dict, register_pass, resolve_recipe

__all__ = ["AnnotatePass", "Pass", "PassContext", "PassError", "PassManager", "PassReport", "PassResult",
           "PassConfig", "Recipe", "build_pass", "config_from_dict", "register_pass", "resolve_recipe"]
