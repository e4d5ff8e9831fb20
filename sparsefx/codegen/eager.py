"""Lower a compressed graph back onto the eager HF model, so ``generate()`` (with KV cache) runs it.

Weight-mask passes edit parameters in place; a capture through ``torch.export`` shares parameters with the HF
model, so most of the time there is nothing to copy. Captures that copy parameters (or passes that replace a
parameter with a new, smaller tensor) are written back by name here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule


@torch.no_grad()
def lower_to_eager(gm: GraphModule, model: nn.Module) -> list[str]:
    """Write every parameter of ``gm`` that is not already the HF model's own tensor back into ``model``.

    Returns the names written. Example:
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
    return written
