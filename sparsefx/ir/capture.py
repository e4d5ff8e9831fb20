"""Capture: a Hugging Face causal LM -> an fx GraphModule through ``torch.export`` (non-strict, dynamic shapes).

The captured module takes ``input_ids: [B, S]`` and returns ``logits: [B, S, V]``. Batch and sequence length are
symbolic, so one capture serves calibration batches, evaluation windows and single tokens. Parameters are the
model's own tensors (not copies): a pass that edits a weight in place edits the HF model too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .meta import EXAMPLE, MODEL_TYPE, PARAM_PREFIX, SOURCE, param_prefix

# get_attr targets in the captured graph are "<PREFIX><HF parameter name>".
PREFIX = "hf."


class _LogitsOnly(nn.Module):
    """Wraps an HF causal LM so that export sees ``input_ids -> logits`` with the KV cache off."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # input_ids: [B, S]
        return self.hf(input_ids=input_ids, use_cache=False).logits  # [B, S, V]


def capture(model: nn.Module, max_seq_len: int | None = None) -> torch.fx.GraphModule:
    """Export ``model`` to a GraphModule with dynamic batch and sequence length.

    Example:
        >>> from sparsefx.models import tiny_model
        >>> gm = capture(tiny_model("llama"))
        >>> gm(torch.zeros(1, 7, dtype=torch.long)).shape
        torch.Size([1, 7, 256])
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face causal LM (no .config); "
                                    "load it with AutoModelForCausalLM")
    max_seq_len = max_seq_len or int(getattr(config, "max_position_embeddings", 4096) or 4096)
    vocab = int(config.vocab_size)
    # Example of batch 2 and length 16: a batch of 1 or tiny lengths would be specialised into the graph.
    example = torch.randint(0, min(vocab, 1000), (2, 16), device=next(model.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max(17, max_seq_len))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(_LogitsOnly(model), (example,), dynamic_shapes=({0: batch, 1: seq},),
                                     strict=False)
    except Exception as exc:  # export errors are long; keep the cause and say what to do
        raise UnsupportedModelError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {str(exc)[:500]}. "
            "sparsefx captures with use_cache=False, non-strict, dynamic batch and sequence length; try "
            "attn_implementation='sdpa' or 'eager' when loading the model"
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    gm.meta[SOURCE] = "export"
    gm.meta[PARAM_PREFIX] = PREFIX
    gm.meta[MODEL_TYPE] = getattr(config, "model_type", "?")
    return gm


def param_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """HF parameter name behind a weight node (``get_attr``), or ``None`` if the node is not a parameter.

    Example:
        >>> param_name(gm, weight_node)  # doctest: +SKIP
        'model.layers.0.self_attn.q_proj.weight'
    """
    if node.op != "get_attr":
        return None
    prefix = param_prefix(gm)
    target = str(node.target)
    return target[len(prefix):] if target.startswith(prefix) else target


def get_param(gm: torch.fx.GraphModule, name: str) -> torch.Tensor:
    """The tensor of HF parameter ``name`` inside ``gm``."""
    return gm.get_parameter(param_prefix(gm) + name)


class ModuleTree(nn.Module):
    """Modules held under their full HF names (``{"model.layers.3": layer}``), so a graph captured from the tree
    names each parameter exactly as the whole model does (``model.layers.3.mlp.up_proj.weight``) — layer indices,
    roles and ``lower_to_eager`` work on it unchanged.

    Example:
        >>> tree = ModuleTree({"model.layers.3": nn.Linear(2, 2)})
        >>> [n for n, _ in tree.named_parameters()]
        ['model.layers.3.weight', 'model.layers.3.bias']
    """

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        for path, module in modules.items():
            *parents, leaf = path.split(".")
            node: nn.Module = self
            for name in parents:
                if name not in node._modules:
                    node.add_module(name, nn.Module())
                node = node._modules[name]
            node.add_module(leaf, module)


class _Stage(nn.Module):
    """``forward(*inputs) = fn(self.hf, *inputs)``: what ``capture_stage`` exports."""

    def __init__(self, tree: ModuleTree, fn):
        super().__init__()
        self.hf = tree
        self._fn = fn

    def forward(self, *inputs):
        return self._fn(self.hf, *inputs)


def _dynamic_dims(x):
    """Export's dynamic-shape spec for an input: every dimension larger than one is symbolic (batch, sequence);
    size-1 dimensions are broadcast ones (``cos``/``sin`` of shape ``[1, S, d]``) and stay static."""
    if isinstance(x, torch.Tensor):
        return {d: torch.export.Dim.AUTO for d in range(x.dim()) if x.shape[d] > 1} or None
    if isinstance(x, (list, tuple)):
        return type(x)(_dynamic_dims(t) for t in x)
    return None


def capture_stage(modules: dict[str, nn.Module], fn, example: tuple, model_type: str = "?",
                  source: str = "block") -> torch.fx.GraphModule:
    """Export ``fn(tree, *example)`` — one decoder block, or the LM head — to a GraphModule whose parameters carry
    their HF names (``ModuleTree``). The sequential pipeline runs the same passes on it as on a whole-model graph.

    ``example``: inputs with batch and sequence length larger than one (those dimensions become symbolic). They are
    kept in ``gm.meta[EXAMPLE]`` for re-propagating shapes.

    Example:
        >>> lin = nn.Linear(4, 3)
        >>> gm = capture_stage({"lm_head": lin}, lambda tree, x: tree.lm_head(x), (torch.randn(2, 5, 4),))
        >>> [n for n, _ in gm.named_parameters()]
        ['hf.lm_head.weight', 'hf.lm_head.bias']
    """
    stage = _Stage(ModuleTree(modules), fn).eval()
    try:
        with torch.no_grad():
            # forward(*inputs): export sees one varargs parameter, so the spec is one tuple
            ep = torch.export.export(stage, tuple(example), dynamic_shapes=(tuple(_dynamic_dims(x) for x in example),),
                                     strict=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"torch.export could not capture {source} {', '.join(modules)}: {type(exc).__name__}: "
            f"{str(exc)[:500]}; compress the model whole (without --sequential) if it fits in memory"
        ) from exc
    gm = ep.module()
    gm.meta[SOURCE] = source
    gm.meta[PARAM_PREFIX] = PREFIX
    gm.meta[MODEL_TYPE] = model_type
    gm.meta[EXAMPLE] = tuple(_detached(x) for x in example)
    return gm


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(t) for t in x)
    return x
