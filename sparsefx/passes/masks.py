"""Weight masks: magnitude and Wanda, unstructured per row or N:M, uniform or per-layer sparsity.

Scores (higher = keep):
  magnitude  S_ij = |W_ij|
  Wanda      S_ij = |W_ij| * ||X_j||_2   (Sun et al. 2023; X_j = input channel j over calibration tokens)
Comparison group: each output row (Wanda's finding: per-output groups beat per-layer ones for LLMs), or each run
of M consecutive input weights of a row for N:M (keep the N best of every M).
Masked weights are zeroed in place; the compressed model stays an ordinary HF model — unless ``pack: true``, which
stores every N:M layer packed (``ops/nm/format.py``: kept values + uint8 in-group indices) as
``sparsefx::nm_linear``: 2:4 in fp32 takes 2.5 bytes per weight instead of 4, and the backend runs it with the
Triton N:M kernel on CUDA. (On CPU there is no N:M kernel: its reference gathers the inputs per kept weight, which
is slower than the dense GEMV, so leave ``pack`` off for CPU decode speed.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError
from ..ir.annotate import ROLES
from ..ir.capture import get_param
from ..ir.meta import LINEAR, MASK
from ..ops.nm.args import NMArgs
from ..ops.nm.format import pack_nm
from .base import Pass, PassReport, PassResult
from .config import PassConfig, check_roles, normalize_overrides, override_for, register_pass
from .rewrite import calibrated_stats, dense_linears, replace_linear

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str, field: str = "pattern") -> tuple[int, int]:
    """``"2:4" -> (2, 4)``; raise ``RecipeError`` naming ``field`` unless 0 < N < M <= 64."""
    m = _NM.match(str(pattern))
    if not m:
        raise RecipeError(f"{field}: expected 'N:M' such as '2:4', got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm or mm > 64:
        raise RecipeError(f"{field}: N:M needs 0 < N < M <= 64, got {pattern!r} (N keeps N of every M weights)")
    return n, mm


def _check_target(value: Any, field: str) -> float | tuple[int, int]:
    if isinstance(value, str):
        return parse_nm(value, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise RecipeError(f"{field}: sparsity must be a number in [0, 1) or an 'N:M' string, got {value!r}")
    return float(value)


def compute_mask(score: torch.Tensor, target: float | tuple[int, int]) -> torch.Tensor:
    """Keep-mask ``[out, in]`` (bool) from ``score: [out, in]``.

    ``target`` is a sparsity in [0, 1) — the ``floor(in * sparsity)`` lowest scores of each row are dropped — or
    ``(N, M)`` — the ``M - N`` lowest of every ``M`` consecutive scores of a row are dropped.

    Example:
        >>> compute_mask(torch.tensor([[1., 4., 2., 3.]]), (2, 4))
        tensor([[False,  True, False,  True]])
    """
    out_f, in_f = score.shape
    mask = torch.ones_like(score, dtype=torch.bool)
    if isinstance(target, tuple):
        n, m = target
        if in_f % m:
            raise RecipeError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {in_f}")
        groups = score.reshape(out_f, in_f // m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.reshape(out_f, in_f // m, m).scatter_(-1, drop, False).reshape(out_f, in_f)
    k = int(in_f * target)
    if k == 0:
        return mask
    drop = torch.topk(score, k, dim=1, largest=False).indices
    return mask.scatter_(1, drop, False)


@dataclass(frozen=True)
class MaskConfig(PassConfig):
    """Shared fields of weight-mask passes.

    sparsity:  fraction of each row's weights removed, in [0, 1); or
    pattern:   "N:M" (keep N of every M consecutive input weights) — give exactly one of the two;
    roles:     which linears (q, k, v, o, gate, up, down; lm_head stays dense unless named);
    overrides: {glob over parameter names: sparsity or "N:M"} — first match wins, 0 leaves a layer dense;
    pack:      store N:M layers packed as ``sparsefx::nm_linear`` (values + indices) instead of dense zeros.
    """

    sparsity: float | None = None
    pattern: str | None = None
    roles: tuple[str, ...] = ROLES
    overrides: tuple[tuple[str, Any], ...] = ()
    pack: bool = False

    def validate(self) -> None:
        if (self.sparsity is None) == (self.pattern is None):
            raise RecipeError(f"{self.method}: give exactly one of sparsity (e.g. 0.5) or pattern (e.g. '2:4')")
        if self.sparsity is not None:
            _check_target(self.sparsity, f"{self.method}.sparsity")
        if self.pattern is not None:
            parse_nm(self.pattern, f"{self.method}.pattern")
        check_roles(self.method, self.roles)
        normalize_overrides(self, _check_target)
        if not isinstance(self.pack, bool):
            raise RecipeError(f"{self.method}.pack must be true or false, got {self.pack!r}")
        nm_override = any(isinstance(_check_target(v, "override"), tuple) for _, v in self.overrides)
        if self.pack and self.pattern is None and not nm_override:
            raise RecipeError(f"{self.method}.pack stores N:M layers packed, but no layer gets an N:M pattern: give "
                              "pattern: '2:4' (or N:M overrides), or drop pack")

    def target_for(self, param: str) -> float | tuple[int, int]:
        """The sparsity or (N, M) that applies to parameter ``param``."""
        default = self.pattern if self.pattern is not None else self.sparsity
        return _check_target(override_for(self, param, default), f"{self.method} target for {param}")


@dataclass(frozen=True)
class MagnitudeConfig(MaskConfig):
    method = "magnitude"


@dataclass(frozen=True)
class WandaConfig(MaskConfig):
    method = "wanda"


class _MaskPass(Pass):
    requires = ("annotated",)
    provides = ("masked",)

    def __init__(self, config: MaskConfig):
        self.config = config

    def score(self, node, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @torch.no_grad()
    def run(self, gm, ctx):
        report = PassReport(self.name)
        layers: dict[str, float] = {}
        zeroed = total = 0
        packed = 0
        for node, info in dense_linears(gm, self.config.roles):
            target = self.config.target_for(info.param)
            if target == 0.0:
                continue
            w = get_param(gm, info.param)
            try:
                mask = compute_mask(self.score(node, w), target)
            except RecipeError as exc:
                raise RecipeError(f"{self.config.method} on {info.param}: {exc}") from None
            w.mul_(mask.to(w.dtype))
            achieved = 1.0 - mask.float().mean().item()
            node.meta[MASK] = {"method": self.config.method, "target": target if isinstance(target, float)
                               else f"{target[0]}:{target[1]}", "sparsity": achieved}
            layers[info.param] = round(achieved, 6)
            zeroed += int((~mask).sum())
            total += mask.numel()
            report.params_changed.append(info.param)
            if self.config.pack and isinstance(target, tuple):
                _pack(gm, node, info, w, target)
                packed += 1
        if packed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        report.matches = len(layers)
        report.details = {"weights_zeroed": zeroed, "weights_in_scope": total,
                          "sparsity": zeroed / total if total else 0.0, "per_param": layers,
                          **({"packed": packed} if self.config.pack else {})}
        return PassResult(gm, bool(layers), report)


def _pack(gm, node, info, w: torch.Tensor, target: tuple[int, int]) -> None:
    """Rewrite the masked linear ``node`` into ``sparsefx::nm_linear`` over its packed weight."""

    n, m = target
    values, index = pack_nm(w.detach(), n, m)
    new = replace_linear(gm, node, info, NMArgs, {"values": ("nm_values", values), "index": ("nm_index", index)},
                         n=n, m=m)
    new.meta[MASK] = {**node.meta[MASK], "packed": True}


@register_pass(MagnitudeConfig)
class MagnitudePass(_MaskPass):
    """Zero the lowest-|W| weights of each row (or of each M-group)."""

    name = "magnitude"

    def score(self, node, weight):
        return weight.abs().float()


@register_pass(WandaConfig)
class WandaPass(_MaskPass):
    """Zero the weights with the lowest ``|W| * ||X||_2`` of each row (or M-group); needs calibration."""

    name = "wanda"
    requires = ("annotated", "calibrated")

    def score(self, node, weight):
        stats = calibrated_stats(node, node.meta[LINEAR], "wanda")
        return weight.abs().float() * stats.channel_l2.to(weight.device)[None, :]
