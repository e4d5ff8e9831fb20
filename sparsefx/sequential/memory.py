"""Peak-memory estimates for a compression run, from the checkpoint's headers and the recipe alone (nothing is
loaded): which pipeline fits, and whether a run fits ``--max-memory`` before it starts.

Whole-model: every weight in fp32, plus what the passes collect for all layers at once (GPTQ-style Gram matrices
``XᵀX`` per linear input: for a 7 B Llama that alone is ~44 GB), plus the logits of a calibration batch.
Sequential: the largest of its stages — embeddings in fp32 (top), one block in fp32 with the statistics and
copies its passes make (blocks), the LM head with its logits (head) — plus the calibration hidden states (inputs
and outputs of a block), the copy of the tensor being written (shards are streamed to disk, not held) and the
Python/torch runtime itself. The figures are estimates
(``bench/scale.py`` records what the runs really peak at).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..passes.config import Recipe
from ..shards import format_size

RUNTIME = 900 * 2**20           # python + torch + transformers + tokenizer, resident before any weight
F32 = 4
_GRAM_METHODS = {"gptq", "svd", "q_then_l", "l_then_q", "dam"}       # X^T X per linear input, fp64
_GRADIENT_METHODS = {"gisp"}                                           # backward through the whole model
_COPY = {"daws": 1.0, "rsparse": 0.5, "svd": 1.0, "q_then_l": 1.0, "l_then_q": 1.0, "dam": 1.0}  # extra fp32 copies


@dataclass
class Shape:
    """What the estimate needs to know of a model (``from_config``)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    attn_width: int            # heads x head_dim (q and o width)
    kv_width: int
    tied: bool
    block_params: int = 0
    outside_params: int = 0

    @classmethod
    def from_config(cls, config) -> "Shape":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        d = int(c.hidden_size)
        i = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d)
        block = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * i + 2 * d
        tied = bool(getattr(c, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
        outside = int(c.vocab_size) * d * (1 if tied else 2) + d
        return cls(int(c.num_hidden_layers), d, i, int(c.vocab_size), heads * head_dim, kv * head_dim, tied, block,
                   outside)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


@dataclass
class Estimate:
    mode: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_size(v)}" for k, v in self.parts.items() if v)
        return f"{self.mode}: about {format_size(self.total)} ({parts})"


def _block_stats(shape: Shape, recipe: Recipe) -> int:
    """Bytes of what the passes collect for one block: fp64 Gram matrices per linear input (q/k/v share one, with
    its first-position twin; o; gate/up share one; down), plus small histograms."""
    if not any(p.method in _GRAM_METHODS for p in recipe.passes):
        return 64 * 2**10 * 4
    d, a, i = shape.hidden, shape.attn_width, shape.intermediate
    return 8 * (2 * d * d + a * a + d * d + i * i)


def _block_work(shape: Shape, recipe: Recipe) -> int:
    """Transient bytes while a block's passes run: copies they keep (DAWS medium tiers, low-rank factors) and the
    per-linear work of GPTQ / SVD (a few fp32 matrices the size of the largest linear or its Hessian)."""
    block = shape.block_params * F32
    copies = max((_COPY.get(p.method, 0.0) for p in recipe.passes), default=0.0)
    if any(getattr(p, "layout", "") == "banded" for p in recipe.passes):
        copies = max(copies, 0.5)
    big = max(shape.hidden, shape.intermediate)
    work = 3 * big * big * F32 if any(p.method in _GRAM_METHODS for p in recipe.passes) else 0
    return int(block * copies) + work


def estimate(shape: Shape, recipe: Recipe, samples: int, seqlen: int, mode: str, processes: int = 1) -> Estimate:
    """Peak resident bytes of one process of a ``mode`` (``whole`` / ``sequential``) run.

    Example:
        >>> from sparsefx.models import tiny_model
        >>> est = estimate(Shape.from_config(tiny_model("llama").config), Recipe.from_yaml(
        ...     "passes: [{method: wanda, sparsity: 0.5}]"), 32, 512, "sequential")
        >>> est.mode
        'sequential'
    """
    needs = recipe.needs_calibration
    n = -(-samples // processes) if needs else 0
    batch = min(recipe.calibration.batch_size, n) if needs else 1
    tokens = n * seqlen
    forward = batch * seqlen * (4 * shape.intermediate + 6 * shape.hidden) * F32     # one block's activations
    if mode == "whole":
        stats = _block_stats(shape, recipe) * shape.layers
        logits = batch * seqlen * shape.vocab * F32 * 2 if needs else 0
        grads = 0
        if any(p.method in _GRADIENT_METHODS for p in recipe.passes):
            # a gradient per weight, and every block's activations kept for the backward pass
            grads = shape.params * F32 + shape.layers * forward
        return Estimate("whole-model", {
            "runtime": RUNTIME, "weights (fp32)": shape.params * F32, "gradients": grads, "statistics": stats,
            "pass work": _block_work(shape, recipe), "activations": forward + logits,
            "tensor being written": _largest_tensor(shape) * 2})
    hidden = 2 * tokens * shape.hidden * F32
    top = shape.vocab * shape.hidden * F32
    block = shape.block_params * F32 + _block_stats(shape, recipe) + _block_work(shape, recipe) + forward
    head_passes = [p for p in recipe.passes if "lm_head" in getattr(p, "roles", ())]
    head = (shape.vocab * shape.hidden * F32 * 2 + batch * seqlen * shape.vocab * F32) if head_passes else 0
    if head_passes and any(p.method in _GRAM_METHODS for p in head_passes):
        head += 8 * shape.hidden * shape.hidden
    stage = max(top, block, head)
    name = {top: "embeddings (fp32)", block: "one block + its statistics", head: "LM head + logits"}[stage]
    return Estimate("sequential", {
        "runtime": RUNTIME, name: stage, "calibration hidden states": hidden,
        "small weights": shape.hidden * 4 * F32, "tensor being written": _largest_tensor(shape) * 2})


def _largest_tensor(shape: Shape) -> int:
    """Elements of the largest single tensor (the writer converts one tensor at a time to its stored dtype)."""
    return max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)
