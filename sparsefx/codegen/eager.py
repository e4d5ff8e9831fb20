"""Lower a compressed graph back onto the eager HF model, so ``generate()`` (with KV cache) runs it.

Two things are written back by name:
  * parameters — weight-mask passes edit them in place; a capture through ``torch.export`` shares them with the
    HF model, so usually nothing is copied, but copies (or resized tensors) are written back here;
  * compressed ops — each linear-like node whose op is not ``aten.linear`` replaces its ``nn.Linear`` in the HF
    model by an eager module that calls the same registered op (``EAGER_MODULES`` maps op -> module factory).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from ..ir.annotate import LINEAR, linear_nodes


class TieredLinear(nn.Module):
    """Eager twin of ``sparsefx::tiered_linear``: an ``nn.Linear`` whose inputs are routed into three tiers.

    ``weight``/``bias`` stay ordinary parameters (saved with the HF model); ``weight_medium`` and the thresholds are
    the compressed state, saved and restored by ``export_state``/``restore`` (see ``sparsefx.artifact``).
    """

    kind = "tiered_linear"

    def __init__(self, weight: nn.Parameter, weight_medium: torch.Tensor, bias, t_high: float, t_low: float):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.register_buffer("weight_medium", weight_medium, persistent=False)
        self.t_high, self.t_low = float(t_high), float(t_low)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.sparsefx.tiered_linear(x, self.weight, self.weight_medium, self.bias, self.t_high, self.t_low)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"t_high": self.t_high, "t_low": self.t_low}, {"weight_medium": self.weight_medium}

    @classmethod
    def restore(cls, linear: nn.Linear, attrs: dict, tensors: dict[str, torch.Tensor]) -> "TieredLinear":
        wm = tensors["weight_medium"]
        if wm.shape != linear.weight.shape:
            raise ValueError(f"weight_medium has shape {tuple(wm.shape)}, the linear {tuple(linear.weight.shape)}")
        return cls(linear.weight, wm.to(linear.weight), linear.bias, attrs["t_high"], attrs["t_low"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, t_high={self.t_high:.4g}, t_low={self.t_low:.4g}"


# Eager modules that carry compressed state, by kind (used to restore artifacts).
EAGER_KINDS: dict[str, type[nn.Module]] = {TieredLinear.kind: TieredLinear}


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` for every module of ``model`` that carries compressed state."""
    return {name: m for name, m in model.named_modules() if getattr(m, "kind", None) in EAGER_KINDS}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _tiered(gm: GraphModule, node, current: nn.Module) -> nn.Module:
    _, _, wm_node, _, t_high, t_low = node.args
    return TieredLinear(current.weight, gm.get_buffer(str(wm_node.target)), current.bias, t_high, t_low)


def _eager_modules():
    from ..ir import ops  # noqa: F401  (registers the ops)

    return {torch.ops.sparsefx.tiered_linear.default: _tiered}


@torch.no_grad()
def lower_to_eager(gm: GraphModule, model: nn.Module) -> list[str]:
    """Write ``gm``'s parameters and compressed ops back into ``model``; return the names written or replaced.

    Example:
        >>> lower_to_eager(gm, model)  # doctest: +SKIP
        []
    """
    prefix = gm.meta.get("sparsefx.prefix", "")
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
    factories = None
    for node in linear_nodes(gm):
        info = node.meta.get(LINEAR)
        if info is None or node.target == torch.ops.aten.linear.default:
            continue
        factories = factories or _eager_modules()
        if node.target not in factories:
            raise NotImplementedError(f"no eager lowering for {node.target} at node {node.name!r}")
        replace_module(model, info.module, factories[node.target](gm, node, model.get_submodule(info.module)))
        written.append(info.module)
    return written
