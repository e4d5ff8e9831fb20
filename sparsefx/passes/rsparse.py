"""R-Sparse (Zhang et al. 2025), an activation-sparsity baseline: sparse input plus a low-rank branch.

Dropping the small input channels of ``y = W x`` throws their (many, small) contributions away. R-Sparse keeps
them approximately: channels with ``|x_i| >= t`` use the full weights, the rest go through a rank-r SVD
approximation of W,

    y = W[:, keep] x[keep] + U_r (V_r x[~keep]),        U_r = U S^1/2 [out, r],  V_r = S^1/2 V^T [r, in].

Cost per token, in multiply-adds: ``p_keep * in * out + r * (in + out)`` (the factors are counted at full input
width, an upper bound). For a target effective sparsity ``s`` the budget ``(1 - s) * in * out`` is split:
``rank_share`` of it buys the rank r, the rest the kept channels, whose threshold is the calibrated |x|
quantile. (The paper searches per-layer sparsity/rank ratios evolutionarily; here the share is one knob.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..ir.annotate import ROLES
from ..ir.capture import get_param
from ..ir.meta import param_prefix
from ..ops.rsparse.args import SparseLowRankArgs
from .base import Pass, PassReport, PassResult
from .config import PassConfig, check_fraction, normalize_overrides, override_for, register_pass
from .rewrite import calibrated_stats, dense_linears


@dataclass(frozen=True)
class RSparseConfig(PassConfig):
    """sparsity: target effective sparsity; rank_share: fraction of the remaining compute spent on the low-rank
    branch; roles/overrides as for daws."""

    method = "rsparse"
    sparsity: float = 0.5
    rank_share: float = 0.2
    roles: tuple[str, ...] = ROLES
    overrides: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        check_fraction(self.sparsity, "rsparse.sparsity")
        check_fraction(self.rank_share, "rsparse.rank_share")
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise RecipeError(f"rsparse.roles: unknown role(s) {bad or '(empty)'}; choose from {list(ROLES)}")
        normalize_overrides(self, check_fraction)


def lowrank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u [out, r], v [r, in])`` with ``u @ v`` the best rank-r approximation of ``w`` (singular values split
    evenly between the factors).

    Example:
        >>> u, v = lowrank_factors(torch.randn(8, 5), 2); (u @ v).shape
        torch.Size([8, 5])
    """
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = S[:rank].sqrt()
    # contiguous: LAPACK returns column-major U, and a stride change alters GEMM summation order (and so the bits
    # of the output) between a fresh model and one restored from an artifact.
    return ((U[:, :rank] * root).to(w.dtype).contiguous(),
            (root[:, None] * Vh[:rank]).to(w.dtype).contiguous())


@register_pass(RSparseConfig)
class RSparsePass(Pass):
    """Rewrite each selected linear into ``sparsefx::sparse_lowrank_linear``."""

    name = "rsparse"
    requires = ("annotated", "calibrated")
    provides = ("tiered",)

    def __init__(self, config: RSparseConfig):
        self.config = config

    @torch.no_grad()
    def run(self, gm, ctx):
        op = torch.ops.sparsefx.sparse_lowrank_linear.default
        prefix = param_prefix(gm)
        report = PassReport(self.name)
        per_param, skipped, total = {}, 0.0, 0
        for node, info in dense_linears(gm, self.config.roles):
            in_f, out_f = info.in_features, info.out_features
            total += in_f * out_f
            s = float(override_for(self.config, info.param, self.config.sparsity))
            if s == 0.0:
                continue
            stats = calibrated_stats(node, info, "rsparse")
            budget = (1.0 - s) * in_f * out_f
            rank = max(1, int(self.config.rank_share * budget / (in_f + out_f)))
            keep = max(0.0, (budget - rank * (in_f + out_f)) / (in_f * out_f))
            t = stats.quantile(1.0 - keep) if keep < 1.0 else 0.0
            p_keep = 1.0 - stats.fraction_below(t)
            u, v = lowrank_factors(get_param(gm, info.param), rank)
            module = gm.get_submodule(prefix + info.module)
            module.register_buffer("lowrank_u", u)
            module.register_buffer("lowrank_v", v)
            weight_node = node.args[1]
            with gm.graph.inserting_before(node):
                u_node = gm.graph.get_attr(prefix + info.module + ".lowrank_u")
                v_node = gm.graph.get_attr(prefix + info.module + ".lowrank_v")
                for n, val in ((u_node, u), (v_node, v)):
                    n.meta["val"] = weight_node.meta["val"].new_empty(val.shape) if "val" in weight_node.meta else val
                call = SparseLowRankArgs(x=node.args[0], weight=weight_node, u=u_node, v=v_node,
                                         bias=node.args[2] if len(node.args) > 2 else None, t=t)
                new = gm.graph.call_function(op, call.as_args())
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            effective = 1.0 - (p_keep * in_f * out_f + rank * (in_f + out_f)) / (in_f * out_f)
            skipped += effective * in_f * out_f
            per_param[info.param] = {"t": t, "rank": rank, "p_keep": round(p_keep, 4),
                                     "effective_sparsity": round(effective, 4)}
            report.params_changed.append(info.param)
        gm.recompile()
        report.matches = len(per_param)
        report.details = {"effective_sparsity": skipped / total if total else 0.0, "per_param": per_param,
                          "macs_skipped": skipped, "macs_total": total}
        return PassResult(gm, bool(per_param), report)
