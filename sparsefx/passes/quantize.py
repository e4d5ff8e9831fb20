"""Weight quantization passes: ``rtn`` and ``gptq`` rewrite each selected linear into ``sparsefx::quant_linear``.

    passes:
      - method: gptq          # or rtn
        bits: 3               # 2, 3, 4, 8
        group_size: 128       # 32, 64, 96, 128, 192, 256, 576
        symmetric: false

GPTQ needs each linear input's Gram matrix ``X^T X`` on calibration tokens; they are collected in one pass over the
dense model (every layer sees full-precision inputs, not the outputs of already-quantized layers). The report
gives stored bytes and bits per weight per linear and in total (codes, fp16 scales, uint8 zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from .. import distributed
from ..errors import CalibrationError, RecipeError
from ..ir.annotate import ROLES
from ..ir.capture import get_param
from ..ir.meta import QUANT
from ..ops.quant.args import QuantArgs
from ..ops.quant.format import QuantizedWeight, QuantSpec
from .base import PassContext
from .calibrate import insert_observers, remove_observers, run_calibration
from .config import PassConfig, check_roles, register_pass
from .quant import SCALE_RULES, quantize_gptq, quantize_rtn
from .rewrite import LinearRewritePass, replace_linear


@dataclass(frozen=True)
class QuantConfig(PassConfig):
    """bits, group_size, symmetric: the format (``ops/quant/format.py``); scale: how a symmetric group's scale is
    chosen (``absmax``, GPTQ's, or ``signed_max``, llama.cpp Q4_0's: see ``quant.group_params``); roles: which linears
    (lm_head stays dense unless named); v_sink: GPTQ weighs the attention-sink position of value projections by the
    sequence length (``InputGram.for_role``)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale: str = "absmax"
    roles: tuple[str, ...] = ROLES
    v_sink: bool = True

    def validate(self) -> None:
        try:
            self.spec
        except RecipeError as exc:
            raise RecipeError(f"{self.method}.{exc}") from None
        if self.scale not in SCALE_RULES:
            raise RecipeError(f"{self.method}.scale: expected one of {', '.join(SCALE_RULES)}, got {self.scale!r}")
        if self.scale != "absmax" and not self.symmetric:
            raise RecipeError(f"{self.method}.scale: {self.scale} applies to symmetric groups; add symmetric: true "
                              "or drop scale")
        check_roles(self.method, self.roles)
        if not isinstance(self.v_sink, bool):
            raise RecipeError(f"{self.method}.v_sink must be true or false, got {self.v_sink!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class RtnConfig(QuantConfig):
    method = "rtn"


@dataclass(frozen=True)
class GptqConfig(QuantConfig):
    """Extra fields: ``damp`` (fraction of the mean Hessian diagonal added to it; GPTQ's 0.01 assumes far more
    calibration tokens than the protocol's 16 k — raise it when GPTQ overfits), ``block`` (lazy-update width),
    ``precision`` (``float64``, default, or ``float32``: what the Hessian's factorization and the column loop compute
    in; GPTQ's reference code uses float32 — half the memory and about twice as fast on 7B-class layers; the Gram
    matrix is accumulated in float64 either way)."""

    method = "gptq"
    damp: float = 0.01
    block: int = 128
    precision: str = "float64"

    def validate(self) -> None:
        super().validate()
        check_damp(self.method, self.damp)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise RecipeError(f"gptq.block must be a positive integer, got {self.block!r}")
        if self.precision not in ("float64", "float32"):
            raise RecipeError(f"gptq.precision must be float64 or float32, got {self.precision!r}")


def check_damp(method: str, damp) -> None:
    """GPTQ's damping: a fraction of the mean Hessian diagonal added to the diagonal, in [0, 10]."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 10:
        raise RecipeError(f"{method}.damp must be a number in [0, 10] (a fraction of the mean Hessian diagonal), "
                          f"got {damp!r}")


@dataclass
class InputGram:
    """Second moments of one linear input over the calibration tokens: ``gram = X^T X`` over all tokens, ``first``
    the same over each sequence's first position only, ``seqlen`` the calibration length."""

    gram: torch.Tensor
    first: torch.Tensor | None      # None where no value projection reads this input (only ``v`` uses it)
    seqlen: int

    def for_role(self, role: str, v_sink: bool = True) -> torch.Tensor:
        """The Gram matrix GPTQ should use for a linear of ``role``. A value projection's first position is the
        attention sink that every later query reads, so its error counts ``seqlen`` times, not once: weighting its
        ``x x^T`` by ``seqlen - 1`` more keeps GPTQ from trading sink accuracy for average accuracy (measured on
        SmolLM2: plain GPTQ on v_proj loses to RTN, sink-weighted GPTQ does not)."""
        if self.gram is None:
            raise ValueError("this Gram matrix was released to its last linear (InputGram.release)")
        if role == "v" and v_sink and self.seqlen > 1:
            if self.first is None:
                raise ValueError("this input's first-position Gram was not collected (input_grams(first_for=...))")
            return self.gram + (self.seqlen - 1) * self.first
        return self.gram

    def release(self, role: str, v_sink: bool = True) -> torch.Tensor:
        """``for_role`` for the last linear that reads this input: the InputGram lets go of its matrices, so the
        caller holds the only reference and may work on it in place (``quant.quantize_gptq(consume=True)``)."""
        h = self.for_role(role, v_sink)
        self.gram = self.first = None
        return h


class GramObserver(nn.Module):
    """Identity module accumulating an ``InputGram`` (float64) of what flows through it (``x: [B, S, C]``).
    ``first=False`` skips the first-position Gram (only value projections use it; it costs another C x C)."""

    def __init__(self, channels: int, first: bool = True):
        super().__init__()
        self.channels = channels
        self.n_tokens, self.seqlen = 0, 1
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)
        self.first = torch.zeros(channels, channels, dtype=torch.float64) if first else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, C]
        flat = x.detach().reshape(-1, self.channels).float()
        # fp32 product, accumulated in fp64 in place (no fp64 temporary: for C = 11008 that would be another GB)
        self.gram.add_((flat.T @ flat).cpu())
        self.n_tokens += flat.shape[0]
        if x.dim() == 3:
            self.seqlen = x.shape[1]
            if self.first is not None:
                x0 = x.detach()[:, 0].float()             # [B, C]: each sequence's first position
                self.first.add_((x0.T @ x0).cpu())
        return x

    def stats(self) -> InputGram:
        return InputGram(self.gram, self.first, self.seqlen)

    def all_reduce_(self) -> None:
        """Sum the Gram matrices over every process of a ``torchrun`` calibration."""
        n = torch.tensor([self.n_tokens], dtype=torch.float64)
        distributed.all_reduce_([t for t in (self.gram, self.first, n) if t is not None])
        self.n_tokens = int(n.item())


def input_grams(gm: GraphModule, ctx: PassContext, nodes: list[str],
                first_for: set[str] | None = None) -> dict[str, InputGram]:
    """``{input node name: InputGram}`` for the inputs named in ``nodes``, over ``ctx.calibration``; the
    first-position Gram only for the inputs in ``first_for`` (default: all)."""
    if ctx.calibration is None:
        raise CalibrationError("gptq needs calibration data, but none was given; pass "
                               "calibration=data.calibration_batches(tokenizer)")
    by_name = {n.name: n for n in gm.graph.nodes}
    inserted = insert_observers(gm, [by_name[n] for n in dict.fromkeys(nodes)], factory=GramObserver)
    for src, mod in inserted.items():
        if first_for is not None and src not in first_for:
            gm.get_submodule(mod).first = None
    try:
        run_calibration(gm, ctx.calibration, ctx.batch_size, ctx.progress)
    finally:
        grams = remove_observers(gm, inserted)
    bad = [n for n, g in grams.items() if not torch.isfinite(g.gram).all()]
    if bad:
        raise CalibrationError(f"non-finite input statistics at {bad[:3]}; run the model in float32")
    return grams


class _QuantPass(LinearRewritePass):
    def quantize(self, w: torch.Tensor, gram: InputGram | None, role: str, last_use: bool = False) -> QuantizedWeight:
        raise NotImplementedError

    def rewrite(self, gm, node, info, gram, last_use=False):
        spec = self.config.spec
        qw = self.quantize(get_param(gm, info.param), gram, info.role, last_use)
        buffers = {"packed": ("qweight_packed", qw.packed), "scales": ("qweight_scales", qw.scales),
                   "zeros": ("qweight_zeros", qw.zeros)}
        new = replace_linear(gm, node, info, QuantArgs, buffers, bits=spec.bits, group_size=spec.group_size)
        new.meta[QUANT] = {**qw.attrs(), "bytes": qw.nbytes}
        return qw.nbytes, {"bytes": qw.nbytes}

    def summary(self):
        spec = self.config.spec
        return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric}


@register_pass(RtnConfig)
class RtnPass(_QuantPass):
    """Round every group of every selected linear to its nearest codes."""

    name = "rtn"

    def quantize(self, w, gram, role, last_use=False):
        return quantize_rtn(w, self.config.spec, self.config.scale)


@register_pass(GptqConfig)
class GptqPass(_QuantPass):
    """GPTQ on the Gram matrices of the dense model's linear inputs."""

    name = "gptq"
    uses_calibration = True

    def grams(self, gm, ctx, linears):
        return input_grams(gm, ctx, [info.input_node for _, info in linears],
                           first_for={info.input_node for _, info in linears if info.role == "v"})

    def quantize(self, w, gram, role, last_use=False):
        h = gram.release(role, self.config.v_sink) if last_use else gram.for_role(role, self.config.v_sink)
        # a value projection's matrix is a sum made for it (for_role): consumable even when the input has readers left
        consume = last_use or (role == "v" and h is not gram.gram)
        dtype = getattr(torch, self.config.precision)                 # validated: float64 or float32
        if h.dtype != dtype:
            # this call's own converted copy; a released float64 original is freed here, before the factorization
            h, consume = h.to(dtype), True
        return quantize_gptq(w, h, self.config.spec, self.config.damp, self.config.block, consume=consume,
                             dtype=dtype, rule=self.config.scale)
