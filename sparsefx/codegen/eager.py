"""Lower a compressed graph back onto the eager HF model, so ``generate()`` (with KV cache) runs it.

Two things are written back by name:
  * parameters — weight-mask passes edit them in place; a capture through ``torch.export`` shares them with the
    HF model, so usually nothing is copied, but copies (or resized tensors) are written back here;
  * a structure plan (GISP and other structured removal, ``gm.meta[PLAN]``) — the HF model is physically shrunk
    to the plan's target level and keeps the plan as ``model.sparsefx_structure`` (saved with artifacts);
  * compressed ops — each ``sparsefx::*`` node replaces an HF module (its ``nn.Linear``, or for a node that is not
    linear-like the module named by ``node.meta[MODULE]``) by an eager module that calls the same registered op
    (each op's ``OpSpec.to_eager``, ``sparsefx/ops``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from ..ir.meta import param_prefix
from ..ops import REGISTRY, eager_kinds, spec_for_target
from ..passes.structured import PLAN, STRUCTURE_ATTR, shrink_model

# Eager modules that carry compressed state, by kind (used to restore artifacts): one per registered op.
EAGER_KINDS: dict[str, type[nn.Module]] = eager_kinds()


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` for every module of ``model`` that carries compressed state."""
    return {name: m for name, m in model.named_modules() if getattr(m, "kind", None) in EAGER_KINDS}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _apply_structure(gm: GraphModule, model: nn.Module) -> list[str]:
    plan = gm.meta.get(PLAN)
    if plan is None:
        return []
    before = {n: p.shape for n, p in model.named_parameters()}
    shrink_model(model, plan, plan.target)
    setattr(model, STRUCTURE_ATTR, plan)
    return sorted(n for n, p in model.named_parameters() if before.get(n) != p.shape)


@torch.no_grad()
def lower_to_eager(gm: GraphModule, model: nn.Module) -> list[str]:
    """Write ``gm``'s parameters and compressed ops back into ``model``; return the names written or replaced.

    Example:
        >>> lower_to_eager(gm, model)  # doctest: +SKIP
        []
    """
    prefix = param_prefix(gm)
    written = []
    for full, param in gm.named_parameters(remove_duplicate=False):
        if not full.startswith(prefix):
            continue
        name = full[len(prefix):]
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        current = getattr(module, attr)
        if current is param:
            continue
        if current.shape == param.shape:
            current.copy_(param)
        else:
            setattr(module, attr, nn.Parameter(param.detach().clone(), requires_grad=current.requires_grad))
        written.append(name)
    written += _apply_structure(gm, model)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("sparsefx."):
            continue
        spec = spec_for_target(node.target)
        if spec is None:
            raise NotImplementedError(f"no eager lowering for {node.target} at node {node.name!r} (not an op of the "
                                      f"registry: {sorted(REGISTRY)})")
        name, module = spec.to_eager(gm, node, model)
        replace_module(model, name, module)
        written.append(name)
    return written
