"""Structured removal shared by GISP and its baselines: removal orders, levels, and physical shrinking.

A structured pass does not edit the graph. It ranks the units of the dependency graph's groups (one KV group —
its KV head and the query heads it serves — or one MLP channel; see ``ir.depgraph``) and records a
``StructurePlan`` in ``gm.meta[PLAN]``: the order in which units leave the model. Because the order is one list,
every sparsity level is a prefix of it, and the subnetworks are nested ("prune once, deploy many").

A *level* is the fraction of prunable parameters removed: the parameters of every group member (q/k/v/o rows and
columns, gate/up/down rows and columns, their biases). ``plan.removed(level)`` is the shortest prefix that
reaches it. The last ``min_units`` units of a group are never in the order, so no layer loses all of its heads
or all of its channels.

Physical removal (``shrink_model``) slices the HF model's parameters by name; the model then runs ``generate()``
with its KV cache (fewer KV heads per layer, narrower MLPs) and can be captured again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import ArtifactError
from ..ir.capture import get_param
from ..ir.depgraph import Group, coupled_groups
from ..ir.meta import PLAN

log = logging.getLogger(__name__)

STRUCTURE_ATTR = "sparsefx_structure"   # HF model attribute: the StructurePlan the model was shrunk with


@dataclass
class StructurePlan:
    """Groups of the dense model, the order their units are removed in, and the level already applied.

    ``order``: ``[(group index, unit index in the dense model, score)]``, first removed first.
    ``exact_until``: levels up to this one come from the method's own schedule; beyond it the order is the last
    scoring round's ranking of what was left (reported when such a level is loaded).
    ``applied``: how many units of the order the model holding this plan has already lost (0: dense).
    ``target``: the level that lowering prunes the model to (the recipe's ``level``).
    """

    groups: list[Group]
    unit_params: list[int]
    order: list[tuple[int, int, float]] = field(default_factory=list)
    method: str = ""
    exact_until: float = 1.0
    applied: int = 0
    target: float = 0.0
    steps: list[dict] = field(default_factory=list)

    @classmethod
    def for_graph(cls, gm: GraphModule, method: str = "") -> "StructurePlan":
        groups = coupled_groups(gm)
        return cls(groups, [unit_params(gm, g) for g in groups], method=method)

    @property
    def total_params(self) -> int:
        """Prunable parameters of the dense model (all group members)."""
        return sum(g.n_units * p for g, p in zip(self.groups, self.unit_params))

    def removed(self, level: float) -> int:
        """Length of the shortest prefix of ``order`` removing at least ``level`` of the prunable parameters."""
        if not 0.0 <= level < 1.0:
            raise ValueError(f"level must be in [0, 1), got {level}")
        need, got = level * self.total_params - 0.5, 0    # parameters are whole: half a one absorbs rounding
        for i, (g, _, _) in enumerate(self.order):
            if got >= need:
                return i
            got += self.unit_params[g]
        if got < need:
            raise ValueError(f"level {level:.3f} is beyond this plan: its order removes at most "
                             f"{got / self.total_params:.3f} of the prunable parameters")
        return len(self.order)

    def level_of(self, n_removed: int) -> float:
        """Fraction of prunable parameters that the first ``n_removed`` units of the order hold."""
        return sum(self.unit_params[g] for g, _, _ in self.order[:n_removed]) / self.total_params

    @property
    def max_level(self) -> float:
        return self.level_of(len(self.order))

    def reachable(self, level: float) -> float:
        """``level``, or the plan's maximum when guards (``min_units``, ``kinds``) stop the order before it."""
        if level <= self.max_level:
            return level
        log.warning("level %.3f cannot be reached: the groups' guards leave at most %.3f of the prunable parameters "
                    "removable; using %.3f", level, self.max_level, self.max_level)
        return self.max_level

    def kept_units(self, n_removed: int) -> list[torch.Tensor]:
        """Per group, the dense-model indices of the units kept once the first ``n_removed`` have gone (ascending)."""
        gone: list[set[int]] = [set() for _ in self.groups]
        for g, u, _ in self.order[:n_removed]:
            gone[g].add(u)
        return [torch.tensor([u for u in range(grp.n_units) if u not in gone[i]], dtype=torch.long)
                for i, grp in enumerate(self.groups)]

    def describe(self, level: float) -> dict:
        """Counts at ``level``: units kept per kind, parameters removed (fraction of prunable)."""
        n = self.removed(level)
        kept = self.kept_units(n)
        out: dict = {"level": round(self.level_of(n), 6), "units_removed": n}
        for kind in ("attention", "mlp"):
            idx = [i for i, g in enumerate(self.groups) if g.kind == kind]
            out[f"{kind}_units"] = sum(self.groups[i].n_units for i in idx)
            out[f"{kind}_units_kept"] = sum(len(kept[i]) for i in idx)
        return out

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "exact_until": self.exact_until, "applied": self.applied,
                           "target": self.target,
                           "groups": [{"kind": g.kind, "layer": g.layer, "n_units": g.n_units,
                                       "members": [list(m) for m in g.members]} for g in self.groups],
                           "unit_params": self.unit_params, "order": [list(o) for o in self.order],
                           "steps": self.steps}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StructurePlan":
        try:
            d = json.loads(text)
            groups = [Group(g["kind"], int(g["layer"]), int(g["n_units"]),
                            tuple((str(p), int(a), int(b)) for p, a, b in g["members"])) for g in d["groups"]]
            order = [(int(g), int(u), float(s)) for g, u, s in d["order"]]
            plan = cls(groups, [int(p) for p in d["unit_params"]], order, str(d.get("method", "")),
                       float(d.get("exact_until", 1.0)), int(d.get("applied", 0)), float(d.get("target", 0.0)),
                       list(d.get("steps", [])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"structure plan is malformed ({type(exc).__name__}: {exc}); "
                                "re-run `sparsefx compress`") from None
        if not 0 <= plan.applied <= len(order):
            raise ArtifactError(f"structure plan says {plan.applied} units were removed but its order has "
                                f"{len(order)}; re-run `sparsefx compress`")
        for g, u, _ in plan.order:
            if not (0 <= g < len(groups) and 0 <= u < groups[g].n_units):
                raise ArtifactError(f"structure plan names unit {u} of group {g}, which does not exist; "
                                    "re-run `sparsefx compress`")
        return plan


def unit_params(gm: GraphModule, group: Group) -> int:
    """Parameters one unit of ``group`` holds: ``block`` rows (axis 0) or columns (axis 1) of every member."""
    total = 0
    for param, axis, block in group.members:
        shape = get_param(gm, param).shape
        total += block * (shape[1 - axis] if len(shape) == 2 else 1)
    return total


def unit_scores(group: Group, elementwise: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum an element-wise score over each unit of ``group``: ``[n_units]`` (float64).

    ``elementwise[param]`` has the parameter's shape (e.g. ``|w * grad|``); a member's unit owns ``block`` rows
    (axis 0) or columns (axis 1).

    Example:
        >>> g = Group("mlp", 0, 2, (("up.weight", 0, 1), ("down.weight", 1, 1)))
        >>> unit_scores(g, {"up.weight": torch.ones(2, 3), "down.weight": torch.ones(3, 2)}).tolist()
        [6.0, 6.0]
    """
    n = group.n_units
    total = torch.zeros(n, dtype=torch.float64)
    for param, axis, block in group.members:
        s = elementwise[param].double()
        if s.dim() == 1:
            total += s.reshape(n, block).sum(1)
        elif axis == 0:                                   # rows [u*block, (u+1)*block) of [out, in]
            total += s.reshape(n, block * s.shape[1]).sum(1)
        else:                                             # columns of [out, in]
            total += s.t().reshape(n, block * s.shape[0]).sum(1)
    return total


def _element_index(units: torch.Tensor, block: int) -> torch.Tensor:
    return (units[:, None] * block + torch.arange(block)).reshape(-1)


@torch.no_grad()
def zero_units(gm: GraphModule, group: Group, units: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero the elements of ``units`` in every member of ``group`` (in place); return the old values, by param.

    Zeroing a unit's o_proj columns / down_proj column makes its output exactly zero, so a masked model computes
    what the physically smaller one would.
    """
    saved = {}
    for param, axis, block in group.members:
        p = get_param(gm, param)
        idx = _element_index(units, block)
        saved[param] = p.index_select(axis, idx).clone()
        p.index_fill_(axis, idx, 0.0)
    return saved


@torch.no_grad()
def restore_units(gm: GraphModule, group: Group, units: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
    """Undo ``zero_units``."""
    for param, axis, block in group.members:
        get_param(gm, param).index_copy_(axis, _element_index(units, block), saved[param])


@torch.no_grad()
def shrink_model(model: nn.Module, plan: StructurePlan, level: float) -> dict:
    """Physically remove the units that ``plan`` removes at ``level`` from the HF model (in place).

    ``model`` must hold what the plan says (``plan.applied`` units removed; the dense model: 0). Parameters are
    re-created with fewer rows/columns, ``nn.Linear.in_features``/``out_features`` follow, ``plan.applied`` is
    updated. Returns ``plan.describe(level)``.

    Example:
        >>> shrink_model(model, plan, 0.3)  # doctest: +SKIP
        {'level': 0.3004, 'units_removed': 1412, ...}
    """
    n = plan.removed(level)
    if n < plan.applied:
        raise ValueError(f"the model is already pruned to level {plan.level_of(plan.applied):.3f}; removed units "
                         f"cannot come back at level {level:.3f} (use an artifact saved at a lower level)")
    if plan.level_of(n) > plan.exact_until + 1e-9:
        log.warning("level %.3f is beyond the %.3f that %s ranked step by step; the units past it follow the last "
                    "scoring round's one-shot ranking", level, plan.exact_until, plan.method or "the plan")
    shrink_to(model, plan, n)
    return plan.describe(level)


@torch.no_grad()
def shrink_to(model: nn.Module, plan: StructurePlan, n_removed: int) -> None:
    """Remove the first ``n_removed`` units of ``plan.order`` from ``model``, which has lost ``plan.applied``."""
    now, then = plan.kept_units(plan.applied), plan.kept_units(n_removed)
    for i, group in enumerate(plan.groups):
        if len(now[i]) == len(then[i]):
            continue
        # positions, within what the model holds now, of the units that stay
        pos = torch.searchsorted(now[i], then[i])
        for param, axis, block in group.members:
            mod_name, _, attr = param.rpartition(".")
            module = model.get_submodule(mod_name)
            old = getattr(module, attr)
            expect = len(now[i]) * block
            if old.shape[axis] != expect:
                raise ValueError(f"{param} has {old.shape[axis]} elements on axis {axis}, the plan expects {expect} "
                                 f"with {plan.applied} units removed; the model does not match the plan")
            new = nn.Parameter(old.index_select(axis, _element_index(pos, block)).contiguous(),
                               requires_grad=old.requires_grad)
            setattr(module, attr, new)
            if isinstance(module, nn.Linear) and attr == "weight":
                module.out_features, module.in_features = new.shape
    plan.applied = n_removed


__all__ = ["PLAN", "STRUCTURE_ATTR", "StructurePlan", "restore_units", "shrink_model", "shrink_to", "unit_params",
           "unit_scores", "zero_units"]
