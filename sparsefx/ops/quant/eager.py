"""Eager modules of the quantized ops and the lowering of their nodes."""

from __future__ import annotations

import torch
from torch import nn

from ...ir.annotate import LINEAR
from ..spec import call_directly
from . import op as _op  # noqa: F401  (defines the ops these modules call)
from .args import BUFFERS, LowRankQuantArgs, QuantArgs
from .format import QuantizedWeight, QuantSpec


class QuantLinear(nn.Module):
    """Eager twin of ``sparsefx::quant_linear``: a linear whose weight is stored packed (``format.py``). It holds
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
        return QuantizedWeight(self.qweight_packed, self.qweight_scales, self.qweight_zeros, self.spec,
                               (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        op = self.decode_kernel if call_directly(self, x) else torch.ops.sparsefx.quant_linear
        return op(x, self.qweight_packed, self.qweight_scales, self.qweight_zeros, self.bias, self.spec.bits,
                  self.spec.group_size)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        qw = self.qweight
        return qw.attrs(), qw.tensors()

    @classmethod
    def restore(cls, linear: nn.Module, attrs: dict, tensors: dict[str, torch.Tensor]) -> "QuantLinear":
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
    buffers are the op's stored tensors, by the names in ``args.BUFFERS``; no dense weight is kept."""

    kind = "lowrank_quant_linear"
    stores_dense_weight = False     # the checkpoint has no ``weight`` for this linear

    def __init__(self, tensors: dict[str, torch.Tensor | None], attrs: dict, bias: nn.Parameter | None):
        super().__init__()
        self.bias, self.attrs = bias, dict(attrs)
        self.in_features, self.out_features = int(attrs["in_features"]), int(attrs["out_features"])
        for key in BUFFERS:
            self.register_buffer(key, tensors.get(key), persistent=False)
        self.decode_kernel = None  # set by codegen.cpu.prepare_cpu_decode: the op's CPU kernel (same signature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        a = self.attrs
        op = self.decode_kernel if call_directly(self, x) else torch.ops.sparsefx.lowrank_quant_linear
        return op(x, *(getattr(self, k) for k in BUFFERS), self.bias, a["bits"], a["group_size"], a["factor_bits"],
                  a["factor_group"])

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
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
            raise ValueError(f"low-rank + quantized state computes {tuple(y.shape)}, "
                             f"expected (1, {module.out_features})")
        return module

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.lq_d.shape[0]}, "
                f"bits={self.attrs['bits'] if self.lq_packed is not None else '-'}, "
                f"factor_bits={self.attrs['factor_bits']}")



def quant_to_eager(gm, node, model: nn.Module):
    a = QuantArgs.from_node(node)
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    spec = QuantSpec(a.bits, a.group_size, a.zeros is None)
    qw = QuantizedWeight(gm.get_buffer(str(a.packed.target)), gm.get_buffer(str(a.scales.target)),
                         None if a.zeros is None else gm.get_buffer(str(a.zeros.target)), spec,
                         (current.out_features, current.in_features))
    return name, QuantLinear(qw, current.bias)


def lowrank_quant_to_eager(gm, node, model: nn.Module):
    a = LowRankQuantArgs.from_node(node)
    name = node.meta[LINEAR].module
    current = model.get_submodule(name)
    tensors = {key: None if t is None else gm.get_buffer(str(t.target)) for key, t in a.stored().items()}
    attrs = {"bits": a.bits, "group_size": a.group_size, "factor_bits": a.factor_bits, "factor_group": a.factor_group,
             "in_features": current.in_features, "out_features": current.out_features}
    return name, LowRankQuantLinear(tensors, attrs, current.bias)
