"""The IR: an fx GraphModule captured by torch.export, annotated with what each linear is.

Pipeline stages in this package: capture -> annotate -> (dependency graph) -> verify.
"""

from .annotate import LAYERS, LINEAR, ROLES, LayerInfo, LinearInfo, annotate, annotated_linears, linear_nodes
from .capture import capture, get_param, param_name
from .depgraph import Group, build_dependency_graph, coupled_groups, unit_mask
from .verify import IRError, propagate_shapes, verify

__all__ = ["LAYERS", "LINEAR", "ROLES", "LayerInfo", "LinearInfo", "annotate", "annotated_linears", "linear_nodes",
           "capture", "get_param", "param_name", "Group", "build_dependency_graph", "coupled_groups", "unit_mask",
           "IRError", "propagate_shapes", "verify"]
