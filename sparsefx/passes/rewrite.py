"""Shared plumbing of passes that rewrite ``aten.linear`` nodes into compressed ops: ``replace_linear`` (one node
into ``op(x, *buffers, bias, *extra)``, its tensors registered as buffers) and ``LinearRewritePass`` (select by
role, check all, rewrite one by one, report stored bytes and bits per weight). Quantization (RTN, GPTQ), the
low-rank + quantization family (DAM & co.), packed N:M masks and banded DAWS use them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.fx import GraphModule

from ..errors import RecipeError
from ..ir.annotate import LinearInfo, annotated_linears
from ..ir.meta import STATS, param_prefix
from ..ops import REGISTRY, ArgsView
from .base import Pass, PassReport, PassResult

if TYPE_CHECKING:                     # annotations only: quantize and calibrate import this module's importers
    from .calibrate import ActStats
    from .quantize import InputGram, QuantConfig


def dense_linears(gm: GraphModule, roles=None) -> Iterator[tuple[torch.fx.Node, LinearInfo]]:
    """The annotated linears of ``roles`` that are still plain ``aten.linear``: an earlier pass may have rewritten
    others into a compressed op, whose weight is no longer a dense parameter to mask, route or quantize."""
    for node, info in annotated_linears(gm, roles):
        if node.target == torch.ops.aten.linear.default:
            yield node, info


def calibrated_stats(node: torch.fx.Node, info: LinearInfo, method: str) -> ActStats:
    """The activation statistics the calibrate pass left on ``node``, or a RecipeError naming the linear."""
    stats = node.meta.get(STATS)
    if stats is None:
        raise RecipeError(f"{method} needs activation statistics for {info.param}; run the calibrate pass first")
    return stats


def replace_linear(gm: GraphModule, node, info, view: type[ArgsView],
                   buffers: dict[str, tuple[str, torch.Tensor | None]], **scalars) -> torch.fx.Node:
    """Replace the ``aten.linear`` ``node`` by a call of the op that ``view`` (its argument view) describes, its
    arguments by name: ``x`` and ``bias`` from ``node``, each of ``buffers`` (``{argument: (buffer name, tensor)}``)
    registered on the linear's module in ``gm`` and read by a new ``get_attr`` node (a ``None`` tensor stays
    ``None``), the rest from ``scalars``. The new node keeps the old one's metadata (``LinearInfo`` included)."""
    prefix = param_prefix(gm)
    module = gm.get_submodule(prefix + info.module)
    args = {"x": node.args[0], "bias": node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"), **scalars}
    for arg, (key, t) in buffers.items():
        if t is None:
            args[arg] = None
            continue
        module.register_buffer(key, t)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"{prefix}{info.module}.{key}")
        attr.meta["val"] = torch.empty_like(t, device="meta")
        args[arg] = attr
    missing = set(view.names()) - set(args)
    if missing:
        raise TypeError(f"replace_linear: {view.op_name} also needs {sorted(missing)}")
    call = view(**{name: args[name] for name in view.names()})
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(REGISTRY[view.op_name].op, call.as_args())
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


class LinearRewritePass(Pass):
    """Shared skeleton of passes that rewrite each selected ``aten.linear`` into a compressed op: select by
    ``config.roles``, ``check`` every linear before any work, collect ``grams`` if needed, ``rewrite`` one by one,
    and report stored bytes and bits per weight (per linear and in total)."""

    requires = ("annotated",)
    provides = ("quantized",)

    def __init__(self, config: QuantConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def check(self, info) -> None:
        """Raise ``RecipeError`` if the linear ``info`` cannot be rewritten under this config."""
        try:
            self.config.spec.check_shape((info.out_features, info.in_features), info.param)
        except RecipeError as exc:
            raise RecipeError(f"{self.config.method}: {exc}") from None

    def grams(self, gm, ctx, linears) -> dict[str, InputGram]:
        return {}

    def rewrite(self, gm, node, info, gram: InputGram | None, last_use: bool = False) -> tuple[int, dict]:
        """Replace ``node``; return the bytes stored for it and extra per-linear report fields. ``last_use``: no
        later linear reads ``gram`` (it may be released, ``InputGram.release``)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Pass-level report fields besides bytes, bits_per_weight and per_param."""
        return {}

    @torch.no_grad()
    def run(self, gm, ctx):
        linears = list(dense_linears(gm, self.config.roles))
        for _, info in linears:
            self.check(info)
        grams = self.grams(gm, ctx, linears)
        report = PassReport(self.name)
        per_param, stored, weights = {}, 0, 0
        uses_left = Counter(info.input_node for _, info in linears)
        for node, info in linears:
            uses_left[info.input_node] -= 1
            last = uses_left[info.input_node] == 0
            # the last reader of an input takes its Gram matrices out of ``grams``: they are freed with it
            gram = grams.pop(info.input_node, None) if last else grams.get(info.input_node)
            nbytes, extra = self.rewrite(gm, node, info, gram, last)
            del gram
            n_w = info.in_features * info.out_features
            per_param[info.param] = {**extra, "bits_per_weight": round(nbytes * 8 / n_w, 4)}
            stored += nbytes
            weights += n_w
            report.params_changed.append(info.param)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        report.matches = len(per_param)
        report.details = {**self.summary(), "bytes": stored, "dense_fp16_bytes": 2 * weights,
                          "bits_per_weight": stored * 8 / weights if weights else 0.0, "per_param": per_param}
        return PassResult(gm, bool(per_param), report)
