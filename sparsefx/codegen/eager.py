"""Lower a compressed graph back onto the eager HF model, so ``generate()`` (with KV cache) runs it.

Two things are written back by name:
  * parameters — weight-mask passes edit them in place; a capture through ``torch.export`` shares them with the
    HF model, so usually nothing is copied, but copies (or resized tensors) are written back here;
  * a structure plan (GISP and other structured removal, ``gm.meta[PLAN]``) — the HF model is physically shrunk
    to the plan's target level and keeps the plan as ``model.sparsefx_structure`` (saved with artifacts);
  * compressed ops — each ``sparsefx::*`` node replaces an HF module (its ``nn.Linear``, or for a node that is not
    linear-like the module named by ``node.meta[MODULE]``) by an eager module that calls the same registered op
    (``_eager_lowerings`` maps op -> lowering).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from ..ir import ops as _ops  # noqa: F401  (defines the sparsefx::* ops these modules call, also in a fresh process)
from ..ir.annotate import LINEAR
from ..ir.meta import MODULE, param_prefix


def _call_directly(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a module prepared by ``prepare_cpu_decode`` calls its ``decode_kernel`` as a plain function: the op
    dispatcher costs tens of us per call (x 200 linears per decoded token). Not under torch.compile (the op is
    traced) or autograd."""
    return (module.decode_kernel is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


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
        # which one-token calls on CPU read instead of weight_medium (codegen.cpu.sparse_gemv.pack_medium)
        for name in PACKED_MEDIUM:
            self.register_buffer(name, None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        # _call_directly first: it is False for unprepared modules, which the backend fx-traces (x is a Proxy there)
        if _call_directly(self, x) and x.numel() == self.in_features:
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
        if _call_directly(self, x) and x.numel() == self.in_features:
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
    low mantissa bits hold each weight's band (``ir/bandformat.py``). It holds no fp32 weight: one fp16 copy in
    memory and in the artifact."""

    kind = "banded_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, banded: torch.Tensor, bias: nn.Parameter | None, thresholds):
        from ..ir.bandformat import MAX_MEDIUMS, check_banded

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
        if _call_directly(self, x) and x.numel() == self.in_features:
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


class SparseLowRankLinear(nn.Module):
    """Eager twin of ``sparsefx::sparse_lowrank_linear`` (R-Sparse): channels with ``|x_i| >= t`` use the full
    weights, the others the rank-r factors ``u: [out, r]``, ``v: [r, in]``."""

    kind = "sparse_lowrank_linear"

    def __init__(self, weight: nn.Parameter, u: torch.Tensor, v: torch.Tensor, bias, t: float):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.t = float(t)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.sparsefx.sparse_lowrank_linear(x, self.weight, self.u, self.v, self.bias, self.t)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"t": self.t}, {"u": self.u, "v": self.v}

    @classmethod
    def restore(cls, linear: nn.Linear, attrs: dict, tensors: dict[str, torch.Tensor]) -> "SparseLowRankLinear":
        u, v = tensors["u"], tensors["v"]
        out_f, in_f = linear.weight.shape
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != out_f or v.shape[1] != in_f or u.shape[1] != v.shape[0]:
            raise ValueError(f"low-rank factors {tuple(u.shape)} x {tuple(v.shape)} do not fit a {out_f}x{in_f} linear")
        return cls(linear.weight, u.to(linear.weight), v.to(linear.weight), linear.bias, attrs["t"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.u.shape[1]}, t={self.t:.4g}"


class ThresholdedAct(nn.Module):
    """An activation followed by ``sparsefx::threshold`` (CATS): outputs with ``|a| < t`` become zero."""

    kind = "thresholded_act"

    def __init__(self, act: nn.Module, t: float):
        super().__init__()
        self.act, self.t = act, float(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsefx.threshold(self.act(x), self.t)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"t": self.t}, {}

    @classmethod
    def restore(cls, act: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "ThresholdedAct":
        return cls(act, attrs["t"])

    def extra_repr(self) -> str:
        return f"t={self.t:.4g}"


class QuantLinear(nn.Module):
    """Eager twin of ``sparsefx::quant_linear``: a linear whose weight is stored packed (``ir/qformat.py``). It holds
    no dense weight, so the model shrinks in memory and in its artifact."""

    kind = "quant_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, qweight, bias: nn.Parameter | None):
        super().__init__()
        self.bias = bias
        self.spec, self.in_features, self.out_features = qweight.spec, qweight.shape[1], qweight.shape[0]
        for key, t in (("qweight_packed", qweight.packed), ("qweight_scales", qweight.scales),
                       ("qweight_zeros", qweight.zeros)):
            self.register_buffer(key, t, persistent=False)
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: the op's CPU kernel (same signature)

    @property
    def qweight(self):
        from ..ir.qformat import QuantizedWeight

        return QuantizedWeight(self.qweight_packed, self.qweight_scales, self.qweight_zeros, self.spec,
                               (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        op = self.decode_kernel if _call_directly(self, x) else torch.ops.sparsefx.quant_linear
        return op(x, self.qweight_packed, self.qweight_scales, self.qweight_zeros, self.bias, self.spec.bits,
                  self.spec.group_size)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        qw = self.qweight
        return qw.attrs(), qw.tensors()

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "QuantLinear":
        from ..ir.qformat import QuantizedWeight

        qw = QuantizedWeight.restore(attrs, tensors)
        if qw.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized weight {qw.shape} does not fit a {linear.out_features}x{linear.in_features} "
                             "linear")
        return cls(qw, linear.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}")


class LowRankQuantLinear(nn.Module):
    """Eager twin of ``sparsefx::lowrank_quant_linear`` (``W ≈ deq(Q) + A diag(d) B``; see ``passes/dam.py``). Its
    buffers are the op's stored tensors, by the names in ``passes.dam.BUFFERS``; no dense weight is kept."""

    kind = "lowrank_quant_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, tensors: dict[str, torch.Tensor | None], attrs: dict, bias: nn.Parameter | None):
        from ..passes.dam import BUFFERS

        super().__init__()
        self.bias, self.attrs = bias, dict(attrs)
        self.in_features, self.out_features = int(attrs["in_features"]), int(attrs["out_features"])
        for key in BUFFERS:
            self.register_buffer(key, tensors.get(key), persistent=False)
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: the op's CPU kernel (same signature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        from ..passes.dam import BUFFERS

        a = self.attrs
        op = self.decode_kernel if _call_directly(self, x) else torch.ops.sparsefx.lowrank_quant_linear
        return op(x, *(getattr(self, k) for k in BUFFERS), self.bias, a["bits"], a["group_size"], a["factor_bits"],
                  a["factor_group"])

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        from ..passes.dam import BUFFERS

        return dict(self.attrs), {k: getattr(self, k) for k in BUFFERS if getattr(self, k) is not None}

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "LowRankQuantLinear":
        module = cls(tensors, attrs, linear.bias)
        if (module.out_features, module.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(f"low-rank + quantized state for {module.out_features}x{module.in_features} does not fit "
                             f"a {linear.out_features}x{linear.in_features} linear")
        with torch.no_grad():
            y = module(torch.zeros(1, module.in_features))   # the stored tensors must agree with each other
        if y.shape != (1, module.out_features):
            raise ValueError(f"low-rank + quantized state computes {tuple(y.shape)}, expected (1, {module.out_features})")
        return module

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.lq_d.shape[0]}, "
                f"bits={self.attrs['bits'] if self.lq_packed is not None else '-'}, "
                f"factor_bits={self.attrs['factor_bits']}")


class NMLinear(nn.Module):
    """Eager twin of ``sparsefx::nm_linear``: an N:M sparse weight stored packed (``ir/nmformat.py``: values +
    uint8 in-group indices) instead of dense, so the model and its artifact shrink (2:4 in fp32: 2.5 bytes per
    weight instead of 4)."""

    kind = "nm_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, values: torch.Tensor, index: torch.Tensor, bias: nn.Parameter | None, n: int, m: int):
        super().__init__()
        self.bias, self.n, self.m = bias, int(n), int(m)
        self.out_features, self.in_features = values.shape[0], values.shape[1] * self.m // self.n
        self.register_buffer("nm_values", values, persistent=False)
        self.register_buffer("nm_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.sparsefx.nm_linear(x, self.nm_values, self.nm_index, self.bias, self.n, self.m)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"n": self.n, "m": self.m}, {"nm_values": self.nm_values, "nm_index": self.nm_index}

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "NMLinear":
        n, m = int(attrs["n"]), int(attrs["m"])
        if not 0 < n < m:
            raise ValueError(f"N:M state with n={n}, m={m}: need 0 < n < m")
        values, index = tensors["nm_values"], tensors["nm_index"]
        if (values.shape != index.shape or index.dtype != torch.uint8 or values.shape[0] != linear.out_features
                or values.shape[1] * m != linear.in_features * n):
            raise ValueError(f"{n}:{m} state (values {tuple(values.shape)}, index {tuple(index.shape)} "
                             f"{index.dtype}) does not fit a {linear.out_features}x{linear.in_features} linear")
        if index.numel() and int(index.max()) >= m:
            raise ValueError(f"{n}:{m} state has an in-group index >= {m}")
        return cls(values, index, linear.bias, n, m)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pattern={self.n}:{self.m}"


# Eager modules that carry compressed state, by kind (used to restore artifacts).
EAGER_KINDS: dict[str, type[nn.Module]] = {m.kind: m for m in (TieredLinear, MultiTierLinear, BandedLinear,
                                                               SparseLowRankLinear,
                                                               ThresholdedAct, QuantLinear, LowRankQuantLinear,
                                                               NMLinear)}


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` for every module of ``model`` that carries compressed state."""
    return {name: m for name, m in model.named_modules() if getattr(m, "kind", None) in EAGER_KINDS}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# Each lowering maps a compressed node to (HF module name, eager module replacing it).
def _tiered(gm: GraphModule, node, model: nn.Module):
    _, w_node, wm_node, _, t_high, t_low = node.args
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    # no medium tier: the weight stands in for the medium weights (never read), so nothing is copied
    wm = current.weight.data if wm_node is w_node else gm.get_buffer(str(wm_node.target))
    return name, TieredLinear(current.weight, wm, current.bias, t_high, t_low)


def _multitier(gm: GraphModule, node, model: nn.Module):
    _, _, medium_nodes, _, thresholds = node.args
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    mediums = [gm.get_buffer(str(m.target)) for m in medium_nodes]
    return name, MultiTierLinear(current.weight, mediums, current.bias, thresholds)


def _banded(gm: GraphModule, node, model: nn.Module):
    _, banded, _, thresholds = node.args
    name = node.meta[LINEAR].module
    return name, BandedLinear(gm.get_buffer(str(banded.target)), model.get_submodule(name).bias, thresholds)


def _sparse_lowrank(gm: GraphModule, node, model: nn.Module):
    _, _, u_node, v_node, _, t = node.args
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    return name, SparseLowRankLinear(current.weight, gm.get_buffer(str(u_node.target)),
                                     gm.get_buffer(str(v_node.target)), current.bias, t)


def _quant(gm: GraphModule, node, model: nn.Module):
    from ..ir.qformat import QuantizedWeight, QuantSpec

    _, packed, scales, zeros, _, bits, group = node.args
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    spec = QuantSpec(bits, group, zeros is None)
    qw = QuantizedWeight(gm.get_buffer(str(packed.target)), gm.get_buffer(str(scales.target)),
                         None if zeros is None else gm.get_buffer(str(zeros.target)), spec,
                         (current.out_features, current.in_features))
    return name, QuantLinear(qw, current.bias)


def _lowrank_quant(gm: GraphModule, node, model: nn.Module):
    from ..passes.dam import BUFFERS

    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    tensors = {k: None if a is None else gm.get_buffer(str(a.target)) for k, a in zip(BUFFERS, node.args[1:11])}
    bits, group, fbits, fgroup = node.args[12:16]
    attrs = {"bits": bits, "group_size": group, "factor_bits": fbits, "factor_group": fgroup,
             "in_features": current.in_features, "out_features": current.out_features}
    return name, LowRankQuantLinear(tensors, attrs, current.bias)


def _nm(gm: GraphModule, node, model: nn.Module):
    _, values, index, _, n, m = node.args
    name = node.meta[LINEAR].module
    return name, NMLinear(gm.get_buffer(str(values.target)), gm.get_buffer(str(index.target)),
                          model.get_submodule(name).bias, n, m)


def _threshold(gm: GraphModule, node, model: nn.Module):
    name = node.meta.get(MODULE)
    if name is None:
        raise NotImplementedError(f"threshold node {node.name!r} has no HF module to replace (the activation is "
                                  "a function call, not a module); sparsefx cannot lower it to the eager model")
    current = model.get_submodule(name)
    if isinstance(current, ThresholdedAct):
        return name, current
    if any(True for _ in current.parameters()):  # the activation is a call inside a bigger module (e.g. the MLP)
        raise NotImplementedError(f"threshold node {node.name!r}: the activation is computed inside {name!r}, not by "
                                  "a module of its own; sparsefx cannot lower it to the eager model")
    return name, ThresholdedAct(current, node.args[1])


def _eager_lowerings():
    from ..ir import ops  # noqa: F401  (registers the ops)

    sf = torch.ops.sparsefx
    return {sf.tiered_linear.default: _tiered, sf.multitier_linear.default: _multitier,
            sf.banded_linear.default: _banded,
            sf.sparse_lowrank_linear.default: _sparse_lowrank,
            sf.threshold.default: _threshold, sf.quant_linear.default: _quant,
            sf.lowrank_quant_linear.default: _lowrank_quant, sf.nm_linear.default: _nm}


def _apply_structure(gm: GraphModule, model: nn.Module) -> list[str]:
    from ..passes.structured import PLAN, STRUCTURE_ATTR, shrink_model

    plan = gm.meta.get(PLAN)
    if plan is None:
        return []
    before = {n: p.shape for n, p in model.named_parameters()}
    shrink_model(model, plan, plan.target)
    setattr(model, STRUCTURE_ATTR, plan)
    return sorted(n for n, p in model.named_parameters() if before.get(n) != p.shape)


@torch.no_grad()
def lower_to_eager(gm: GraphModule, model: nn.Module) -> list[str]:
    """Write ``gm``'s parameters and compressed ops back into ``model``; return the names written or replaced.

    Example:
        >>> lower_to_eager(gm, model)  # doctest: +SKIP
        []
    """
    prefix = param_prefix(gm)
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
    written += _apply_structure(gm, model)
    lowerings = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("sparsefx."):
            continue
        lowerings = lowerings or _eager_lowerings()
        if node.target not in lowerings:
            raise NotImplementedError(f"no eager lowering for {node.target} at node {node.name!r}")
        name, module = lowerings[node.target](gm, node, model)
        replace_module(model, name, module)
        written.append(name)
    return written
