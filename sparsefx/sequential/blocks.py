"""Decoder blocks of an HF causal LM: finding them, and calling them one at a time.

The model's own code runs around its blocks: ``block_kwargs`` replaces every block by an identity stub for one
forward, so that embeddings scaling, rotary tables and (sliding-window) masks are computed exactly as the model
computes them, and records the keyword arguments each block receives. ``head_inputs`` does the same from the
last block's output to what the output embedding (LM head) receives. Only the modules that run outside the blocks
need real weights; the blocks themselves may sit on the meta device.

``BlockCall`` turns one block's keyword arguments into graph inputs: the tensors become inputs of the captured
graph (``ir.capture_stage``), everything else (``None``, flags) is baked in.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..errors import UnsupportedModelError


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the model's decoder blocks — the ``nn.ModuleList`` of ``num_hidden_layers`` modules of
    one class that hold ``nn.Linear`` layers (the largest such list).

    Example:
        >>> find_blocks(tiny_model("llama"))[0]  # doctest: +SKIP
        'model.layers'
    """
    n = getattr(text_config(model), "num_hidden_layers", None)
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or (n is not None and len(m) != n):
            continue
        if len({type(c) for c in m}) != 1 or not any(isinstance(x, nn.Linear) for x in m[0].modules()):
            continue
        found.append((sum(p.numel() for p in m.parameters()), name, m))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): the sequential "
            f"pipeline cannot find its decoder blocks — no nn.ModuleList of {n} modules of one class holding "
            "nn.Linear layers; compress it whole-model (drop --sequential) on a machine where it fits in memory")
    _, name, blocks = max(found, key=lambda f: f[0])
    return name, blocks


class _Stop(Exception):
    """Raised by a stub to end a forward once what it was run for has been recorded."""


@contextlib.contextmanager
def _stubbed(blocks: nn.ModuleList, fn):
    """Replace each block's ``forward`` by ``fn(i, hidden_states, *args, **kwargs)`` (an instance attribute, so the
    module object, its attributes and hooks stay)."""
    for i, block in enumerate(blocks):
        block.forward = functools.partial(fn, i)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@torch.no_grad()
def block_kwargs(model: nn.Module, blocks: nn.ModuleList, embeds: torch.Tensor) -> list[dict]:
    """The keyword arguments each block receives when the model runs on input embeddings ``embeds: [B, S, D]``
    (position embeddings, masks, flags), one dict per block.

    Example:
        >>> kw = block_kwargs(model, find_blocks(model)[1], torch.randn(2, 16, 64))  # doctest: +SKIP
        >>> sorted(kw[0])  # doctest: +SKIP
        ['attention_mask', 'cache', 'position_embeddings', 'position_ids', 'use_cache']
    """
    seen: list[dict] = []
    shapes: list[torch.Size] = []

    def stub(i, hidden_states, *args, **kwargs):
        if args:
            raise UnsupportedModelError(f"{type(model).__name__} passes {len(args)} positional arguments besides the "
                                        "hidden states to its blocks; the sequential pipeline needs keyword arguments")
        seen.append(kwargs)
        shapes.append(hidden_states.shape)
        if i == len(blocks) - 1:
            raise _Stop
        return hidden_states

    with _stubbed(blocks, stub):
        try:
            model(inputs_embeds=embeds, use_cache=False)
        except _Stop:
            pass
    if len(seen) != len(blocks) or any(s != embeds.shape for s in shapes):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not call its {len(blocks)} blocks one after the other on hidden states of "
            f"the input's shape (saw {len(seen)} calls, shapes {sorted({tuple(s) for s in shapes})[:2]}); the "
            "sequential pipeline cannot stream it — compress it whole-model")
    return seen


@torch.no_grad()
def head_inputs(model: nn.Module, blocks: nn.ModuleList, final: torch.Tensor) -> torch.Tensor:
    """What the output embedding (LM head) receives when the last block returns ``final: [B, S, D]`` — the final
    norm applied, by the model's own code."""
    head = model.get_output_embeddings()
    got: list[torch.Tensor] = []

    def stub(i, hidden_states, *args, **kwargs):
        return final if i == len(blocks) - 1 else hidden_states

    def grab(_module, args):
        got.append(args[0])
        raise _Stop

    handle = head.register_forward_pre_hook(grab)
    try:
        with _stubbed(blocks, stub):
            try:
                model(inputs_embeds=torch.zeros_like(final), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not got:
        raise UnsupportedModelError(f"{type(model).__name__}'s output embedding was never called")
    return got[0]


@dataclass
class BlockCall:
    """Calls block ``index`` of ``path`` from a captured graph's inputs ``(hidden, tensors)``: ``tensors`` are the
    tensor leaves of its keyword arguments, ``spec``/``consts`` rebuild the rest.

    Example:
        >>> call, tensors = BlockCall.build("model.layers", 0, kwargs)   # doctest: +SKIP
        >>> y = call(tree, hidden, tensors)                              # doctest: +SKIP
    """

    path: str
    index: int
    spec: TreeSpec
    consts: tuple            # per leaf: None for a tensor input, else (value,)

    @classmethod
    def build(cls, path: str, index: int, kwargs: dict) -> tuple["BlockCall", list[torch.Tensor]]:
        leaves, spec = tree_flatten(kwargs)
        consts = tuple(None if isinstance(x, torch.Tensor) else (x,) for x in leaves)
        return cls(path, index, spec, consts), [x for x in leaves if isinstance(x, torch.Tensor)]

    @property
    def name(self) -> str:
        return f"{self.path}.{self.index}"

    def tensors(self, kwargs: dict) -> list[torch.Tensor]:
        """The tensor inputs for ``kwargs`` (another batch's arguments of the same block): its structure, which
        leaves are tensors, and its constants must be those the block was captured with."""
        leaves, spec = tree_flatten(kwargs)
        same = spec == self.spec and len(leaves) == len(self.consts) and all(
            isinstance(x, torch.Tensor) if c is None else (not isinstance(x, torch.Tensor) and x == c[0])
            for x, c in zip(leaves, self.consts))
        if not same:
            raise UnsupportedModelError(f"block {self.name} is called with other arguments on this batch than on the "
                                        "example it was captured with (a mask present on one and not the other?); "
                                        "the sequential pipeline needs one structure per block")
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def kwargs(self, tensors) -> dict:
        it = iter(tensors)
        return tree_unflatten([next(it) if c is None else c[0] for c in self.consts], self.spec)

    def __call__(self, tree: nn.Module, hidden: torch.Tensor, tensors) -> torch.Tensor:
        return tree.get_submodule(self.name)(hidden, **self.kwargs(tensors))
