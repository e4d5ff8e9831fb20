"""Eager modules of the routed ops (what ``sparsefx.load`` builds and ``generate()`` runs), and the lowering of
each op's node to its module."""

from __future__ import annotations

import torch
from torch import nn

from ...ir.annotate import LINEAR
from ..spec import call_directly
from . import op as _op  # noqa: F401  (defines the ops these modules call, also in a fresh process)
from .args import BandedArgs, MultitierArgs, TieredArgs
from .format import MAX_MEDIUMS, check_banded

PACKED_MEDIUM = ("medium_mask", "medium_values", "medium_offsets")


def _restored_medium(wm: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A medium tier read from an artifact, on the linear's device: a reduced-precision tier (``daws.medium_dtype``)
    keeps its dtype, otherwise it follows the weight's."""
    dtype = wm.dtype if wm.dtype.itemsize < linear.weight.dtype.itemsize else linear.weight.dtype
    return wm.to(linear.weight.device, dtype)


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
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: (x [in], W.T, Wm.T, t_high, t_low) -> y
        # set by prepare_cpu_decode when the medium tier is pruned: its bitmask-packed rows (mask, values, offsets),
        # which one-token calls on CPU read instead of weight_medium (ops.routed.cpu.pack_medium_rows)
        for name in PACKED_MEDIUM:
            self.register_buffer(name, None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        # _call_directly first: it is False for unprepared modules, which the backend fx-traces (x is a Proxy there)
        if call_directly(self, x) and x.numel() == self.in_features:
            # one token: the C++ kernel itself (its signature is not the op's), skipping the op dispatcher
            medium = self.weight_medium.t() if self.medium_packed is None else self.medium_packed
            y = self.decode_kernel(x.reshape(-1), self.weight.t(), medium, self.t_high, self.t_low)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.medium_packed is not None and x.device.type == "cpu":
            return torch.ops.sparsefx_cpu.tiered_linear_packed(x, self.weight, self.weight_medium, *self.medium_packed,
                                                               self.bias, self.t_high, self.t_low)
        return torch.ops.sparsefx.tiered_linear(x, self.weight, self.weight_medium, self.bias, self.t_high, self.t_low)

    @property
    def medium_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None if self.medium_mask is None else (self.medium_mask, self.medium_values, self.medium_offsets)

    @medium_packed.setter
    def medium_packed(self, packed) -> None:
        for name, t in zip(PACKED_MEDIUM, packed if packed is not None else (None,) * 3):
            setattr(self, name, t)

    @property
    def has_medium_weights(self) -> bool:
        """False when the medium tier is empty (TEAL-style) and ``weight_medium`` is the weight's own storage."""
        return self.weight_medium.data_ptr() != self.weight.data_ptr()

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        attrs = {"t_high": self.t_high, "t_low": self.t_low}
        if not self.has_medium_weights:
            return attrs, {}  # nothing to store
        return attrs, {"weight_medium": self.weight_medium}

    @classmethod
    def restore(cls, linear: nn.Linear, attrs: dict, tensors: dict[str, torch.Tensor]) -> "TieredLinear":
        wm = tensors.get("weight_medium", linear.weight.data)  # absent: no medium tier
        if wm.shape != linear.weight.shape:
            raise ValueError(f"weight_medium has shape {tuple(wm.shape)}, the linear {tuple(linear.weight.shape)}")
        return cls(linear.weight, _restored_medium(wm, linear), linear.bias, attrs["t_high"], attrs["t_low"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, t_high={self.t_high:.4g}, t_low={self.t_low:.4g}"


class MultiTierLinear(nn.Module):
    """Eager twin of ``sparsefx::multitier_linear``: DAWS with several medium tiers (``daws.medium_tiers``).

    ``weight``/``bias`` stay the ``nn.Linear``'s parameters; the medium tiers' weights (``medium_0``, ...) and the
    thresholds are the compressed state (``export_state``/``restore``).
    """

    kind = "multitier_linear"

    def __init__(self, weight: nn.Parameter, mediums: list[torch.Tensor], bias, thresholds):
        super().__init__()
        if len(thresholds) != len(mediums) + 1:
            raise ValueError(f"{len(mediums)} medium tiers need {len(mediums) + 1} thresholds, got {len(thresholds)}")
        self.weight, self.bias = weight, bias
        self.n_medium = len(mediums)
        for k, wm in enumerate(mediums):
            self.register_buffer(f"medium_{k}", wm, persistent=False)
        self.thresholds = [float(t) for t in thresholds]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: (x [in], W.T, thresholds) -> y

    @property
    def mediums(self) -> list[torch.Tensor]:
        return [getattr(self, f"medium_{k}") for k in range(self.n_medium)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if call_directly(self, x) and x.numel() == self.in_features:
            y = self.decode_kernel(x.reshape(-1), self.weight.t(), self.thresholds)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return torch.ops.sparsefx.multitier_linear(x, self.weight, self.mediums, self.bias, self.thresholds)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"thresholds": list(self.thresholds)}, {f"medium_{k}": m for k, m in enumerate(self.mediums)}

    @classmethod
    def restore(cls, linear: nn.Linear, attrs: dict, tensors: dict[str, torch.Tensor]) -> "MultiTierLinear":
        thresholds = attrs.get("thresholds")
        if not isinstance(thresholds, list) or len(thresholds) < 2:
            raise ValueError(f"multitier_linear needs a list of at least 2 thresholds, got {thresholds!r}")
        mediums = []
        for k in range(len(thresholds) - 1):
            wm = tensors.get(f"medium_{k}")
            if wm is None or wm.shape != linear.weight.shape:
                raise ValueError(f"medium_{k} is {'missing' if wm is None else f'of shape {tuple(wm.shape)}'}; "
                                 f"the linear is {tuple(linear.weight.shape)}")
            mediums.append(_restored_medium(wm, linear))
        return cls(linear.weight, mediums, linear.bias, thresholds)

    def extra_repr(self) -> str:
        ts = ", ".join(f"{t:.4g}" for t in self.thresholds)
        return f"in={self.in_features}, out={self.out_features}, thresholds=[{ts}]"


class BandedLinear(nn.Module):
    """Eager twin of ``sparsefx::banded_linear`` (``daws.layout: banded``): every DAWS tier in one fp16 matrix whose
    low mantissa bits hold each weight's band (``ops/routed/format.py``). It holds no fp32 weight: one fp16 copy in
    memory and in the artifact."""

    kind = "banded_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, banded: torch.Tensor, bias: nn.Parameter | None, thresholds):
        super().__init__()
        check_banded(banded)
        if not 2 <= len(thresholds) <= MAX_MEDIUMS + 1:
            raise ValueError(f"banded_linear needs 2 to {MAX_MEDIUMS + 1} thresholds, got {thresholds!r}")
        self.bias = bias
        self.register_buffer("weight_banded", banded, persistent=False)
        self.thresholds = [float(t) for t in thresholds]
        self.out_features, self.in_features = banded.shape
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: (x [in], banded.T, thresholds) -> y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if call_directly(self, x) and x.numel() == self.in_features:
            y = self.decode_kernel(x.reshape(-1), self.weight_banded.t(), self.thresholds)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return torch.ops.sparsefx.banded_linear(x, self.weight_banded, self.bias, self.thresholds)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"thresholds": list(self.thresholds)}, {"weight_banded": self.weight_banded}

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "BandedLinear":
        banded, thresholds = tensors.get("weight_banded"), attrs.get("thresholds")
        shape = (linear.out_features, linear.in_features)
        if banded is None or tuple(banded.shape) != shape or banded.dtype != torch.float16:
            found = "missing" if banded is None else f"{banded.dtype} {tuple(banded.shape)}"
            raise ValueError(f"weight_banded is {found}; the linear needs fp16 {shape}")
        if not isinstance(thresholds, list):
            raise ValueError(f"banded_linear needs a list of thresholds, got {thresholds!r}")
        return cls(banded, linear.bias, thresholds)

    def extra_repr(self) -> str:
        ts = ", ".join(f"{t:.4g}" for t in self.thresholds)
        return f"in={self.in_features}, out={self.out_features}, banded, thresholds=[{ts}]"


# Each lowering maps a node of the op to (HF module name, eager module replacing it).
def tiered_to_eager(gm, node, model: nn.Module):
    a = TieredArgs.from_node(node)
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    # no medium tier: the weight stands in for the medium weights (never read), so nothing is copied
    wm = current.weight.data if a.weight_medium is a.weight else gm.get_buffer(str(a.weight_medium.target))
    return name, TieredLinear(current.weight, wm, current.bias, a.t_high, a.t_low)


def multitier_to_eager(gm, node, model: nn.Module):
    a = MultitierArgs.from_node(node)
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    mediums = [gm.get_buffer(str(m.target)) for m in a.mediums]
    return name, MultiTierLinear(current.weight, mediums, current.bias, a.thresholds)


def banded_to_eager(gm, node, model: nn.Module):
    a = BandedArgs.from_node(node)
    name = node.meta[LINEAR].module
    return name, BandedLinear(gm.get_buffer(str(a.weight.target)), model.get_submodule(name).bias, a.thresholds)
