"""Low-rank + quantization in one linear: SVD only, Q→L, L→Q and DAM, at a budget of stored bits per weight.

Every method rewrites a linear into ``sparsefx::lowrank_quant_linear``: ``W ≈ deq(Q) + A diag(d) B``.

  svd        no main weight; ``A diag(d) B`` = the (whitened) truncated SVD of ``W``; fp16 factors, d = 1
  q_then_l   ``Q = GPTQ(W)``, then the factors approximate the residual ``W - deq(Q)``; fp16 factors
  l_then_q   factors first (truncated SVD of ``W``), then ``Q = GPTQ(W - A diag(d) B)``; fp16 factors
  dam        the factors are quantized too (``factor_bits``), so the same bytes buy a higher rank, and the
             diagonal ``d`` — the "adhesive" in the singular values' place — is fitted by least squares on the
             calibration inputs (``lowrank.fit_diagonal``) once the factors and the main weight are quantized, so
             that it absorbs what both quantizations lost along the factor directions (never worse than d = 1).
             Three orders are tried per layer and the one with the lowest output error on the calibration inputs
             is kept: factors of W first, then GPTQ on ``W - A_q B_q``; the same with ``d`` fitted before GPTQ (a
             smaller residual when the factors are coarse); or GPTQ of W first and factors of its residual (the
             q_then_l order). A fourth candidate spends the whole budget on quantized factors (no main weight,
             about ``budget / factor bits`` of the full rank, d fitted to W): at ≈ 2 bits per weight a 2-bit main
             weight loses more than it buys. The report counts which order each linear took.

The rank is the largest that keeps each linear within ``budget`` stored bits per weight: the main weight's codes,
scales and zeros (``bits``/``group_size``), plus per rank unit the factor column and row (fp16, or packed at
``factor_bits`` with fp16 scales and uint8 zeros per ``factor_group``) and its fp16 diagonal entry. Factor
quantization is round-to-nearest (``A^T`` in groups along the output dimension, ``B`` along the input); the main
weight uses GPTQ. ``whiten`` (default) makes the SVD activation-aware (output error on calibration inputs).
Every method folds the singular values into both factors (``lowrank.balance``) before storing them, so that neither
carries the whole dynamic range: the whitened SVD's singular values scale with the calibration Gram (a sum over
tokens) and overflow fp16 on SmolLM2 (the first L→Q run gave NaN); the stored ``d`` starts at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..ir.capture import get_param
from ..ir.meta import LOWRANK
from ..ops.quant.args import BUFFERS, LowRankQuantArgs
from ..ops.quant.format import QuantizedWeight, QuantSpec
from .config import register_pass
from .lowrank import balance, fit_diagonal, svd_factors, whitened_svd_factors
from .quant import quantize_gptq, quantize_rtn
from .quantize import QuantConfig, check_damp, input_grams
from .rewrite import LinearRewritePass, replace_linear


@dataclass(frozen=True)
class LowRankQuantConfig(QuantConfig):
    """budget: stored bits per weight per linear; bits/group_size/symmetric: the main weight (unused by svd);
    factor_bits: 16 (fp16 factors) or 2/3/4/8 (packed, groups of factor_group); whiten: activation-aware SVD;
    damp: GPTQ's damping of the main weight (as ``gptq.damp``)."""

    budget: float = 3.0
    bits: int = 2
    group_size: int = 64
    factor_bits: int = 16
    factor_group: int = 64
    whiten: bool = True
    damp: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_damp(self.method, self.damp)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 32:
            raise RecipeError(f"{self.method}.budget must be a number of bits per weight in (0, 32], got "
                              f"{self.budget!r}")
        if self.factor_bits != 16:
            try:
                self.factor_spec
            except RecipeError as exc:
                raise RecipeError(f"{self.method}.{exc}") from None

    @property
    def factor_spec(self) -> QuantSpec:
        try:
            return QuantSpec(self.factor_bits, self.factor_group, False)
        except RecipeError as exc:
            raise RecipeError(f"factor_{exc} (or 16 for fp16 factors)") from None

    @property
    def has_main(self) -> bool:
        return self.method != "svd"

    def main_bits(self, out_f: int, in_f: int) -> float:
        """Stored bits of the main quantized weight of an ``[out_f, in_f]`` linear (0 for svd)."""
        return self.spec.bits_per_weight * out_f * in_f if self.has_main else 0.0

    def rank_bits(self, out_f: int, in_f: int) -> float:
        """Stored bits of one rank unit: a column of A, a row of B (fp16 or packed) and one fp16 entry of d."""
        per = 16.0 if self.factor_bits == 16 else self.factor_spec.bits_per_weight
        return per * (out_f + in_f) + 16

    def rank_for(self, out_f: int, in_f: int) -> int:
        """Largest rank within the budget for an ``[out_f, in_f]`` linear (0 if not even one unit fits)."""
        return int(max(0.0, self.budget * out_f * in_f - self.main_bits(out_f, in_f)) // self.rank_bits(out_f, in_f))


@dataclass(frozen=True)
class SvdConfig(LowRankQuantConfig):
    method = "svd"


@dataclass(frozen=True)
class QThenLConfig(LowRankQuantConfig):
    method = "q_then_l"


@dataclass(frozen=True)
class LThenQConfig(LowRankQuantConfig):
    method = "l_then_q"


@dataclass(frozen=True)
class DamConfig(LowRankQuantConfig):
    """DAM: quantized factors (``factor_bits`` 4 by default) and a fitted diagonal; ``adhesive: false`` keeps the
    SVD's diagonal (the ablation)."""

    method = "dam"
    factor_bits: int = 4
    adhesive: bool = True


@dataclass
class Decomposition:
    """``W ≈ deq(main) + A diag(d) B``; factors as fp16 tensors or ``QuantizedWeight`` (``A^T`` and ``B``)."""

    main: QuantizedWeight | None
    at: torch.Tensor | QuantizedWeight       # [r, out]
    d: torch.Tensor                          # [r] fp16
    b: torch.Tensor | QuantizedWeight        # [r, in]
    order: str = ""                          # dam: which order produced it (reported)

    @property
    def rank(self) -> int:
        return self.d.numel()

    @staticmethod
    def _dense(t) -> torch.Tensor:
        return t.dequantize() if isinstance(t, QuantizedWeight) else t.float()

    def dense(self) -> torch.Tensor:
        """The ``[out, in]`` matrix this decomposition stands for."""
        low = self._dense(self.at).T @ torch.diag(self.d.float()) @ self._dense(self.b)
        return low if self.main is None else low + self.main.dequantize()

    @property
    def nbytes(self) -> int:
        parts = [self.main, self.at, self.b, self.d]
        return sum(p.nbytes if isinstance(p, QuantizedWeight) else p.numel() * p.element_size()
                   for p in parts if p is not None)


def decompose(config: LowRankQuantConfig, w: torch.Tensor, gram: torch.Tensor, rank: int) -> Decomposition:
    """Decompose one weight ``w: [out, in]`` per ``config.method`` (see the module docstring)."""
    method = config.method
    w = w.float()

    def factors(target, r=rank):
        """Balanced factors (``A' B'``, d folded in) of the best rank-r approximation of ``target``."""
        a, d, b = whitened_svd_factors(target, gram, r) if config.whiten else svd_factors(target, r)
        return balance(a, d, b)

    def gptq(target):
        return quantize_gptq(target, gram, config.spec, config.damp, rule=config.scale)

    ones = torch.ones(rank, dtype=torch.float16)
    if method == "q_then_l":
        main = gptq(w)
        a, b = factors(w - main.dequantize())
        return Decomposition(main, a.T.half(), ones, b.half())
    a, b = factors(w)
    if method == "svd":
        return Decomposition(None, a.T.half(), ones, b.half())
    if method == "l_then_q":
        low = Decomposition(None, a.T.half(), ones, b.half())
        return Decomposition(gptq(w - low.dense()), low.at, low.d, low.b)
    # dam: quantized factors with a fitted adhesive, in whichever order loses least on this layer's inputs
    fspec = config.factor_spec
    adhesive = getattr(config, "adhesive", True)

    def quantized(a, b):
        at_q, b_q = quantize_rtn(a.T.contiguous(), fspec), quantize_rtn(b.contiguous(), fspec)
        return at_q, b_q, at_q.dequantize().T, b_q.dequantize()

    def glued(order, main, at_q, b_q, aq, bq):
        """The decomposition with d fitted to what ``main`` leaves (least squares: never worse than d = 1)."""
        target = w if main is None else w - main.dequantize()
        d = fit_diagonal(target, aq, bq, gram).half() if adhesive else torch.ones(aq.shape[1], dtype=torch.float16)
        return Decomposition(main, at_q, d, b_q, order)

    cands = []
    # low rank first: factors of W; GPTQ on what the quantized factors leave (at d = 1, and — with the adhesive —
    # at the d fitted to W first, which leaves a smaller residual when the factors are coarse)
    at_q, b_q, aq, bq = quantized(a, b)
    cands.append(glued("l_first", gptq(w - aq @ bq), at_q, b_q, aq, bq))
    if adhesive:
        d1 = fit_diagonal(w, aq, bq, gram)
        cands.append(glued("l_first_fit", gptq(w - aq @ torch.diag(d1) @ bq), at_q, b_q, aq, bq))
    # quantization first: GPTQ of W, factors of its residual (what q_then_l does, with quantized factors)
    main = gptq(w)
    cands.append(glued("q_first", main, *quantized(*factors(w - main.dequantize()))))
    # factors only: the main weight's bytes buy rank instead
    out_f, in_f = w.shape
    rank_all = min(int(config.budget * out_f * in_f // config.rank_bits(out_f, in_f)), out_f, in_f)
    if rank_all > rank:
        cands.append(glued("factors_only", None, *quantized(*factors(w, rank_all))))
    return min(cands, key=lambda c: output_error(c.dense() - w, gram))


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X delta^T||_F^2 = tr(delta H delta^T)`` for ``H = X^T X``."""
    delta = delta.double()
    return float(((delta @ gram.double()) * delta).sum())


class _LowRankQuantPass(LinearRewritePass):
    uses_calibration = True

    def check(self, info):
        cfg = self.config
        if cfg.has_main:
            super().check(info)
        out_f, in_f = info.out_features, info.in_features
        if min(cfg.rank_for(out_f, in_f), out_f, in_f) < 1:
            need = (cfg.main_bits(out_f, in_f) + cfg.rank_bits(out_f, in_f)) / (out_f * in_f)
            raise RecipeError(f"{cfg.method}.budget {cfg.budget} leaves no room for a single rank on {info.param}; "
                              f"it needs at least {need:.3f} bits per weight")

    def grams(self, gm, ctx, linears):
        return input_grams(gm, ctx, [info.input_node for _, info in linears],
                           first_for={info.input_node for _, info in linears if info.role == "v"})

    def rewrite(self, gm, node, info, gram, last_use=False):
        cfg = self.config
        rank = min(cfg.rank_for(info.out_features, info.in_features), info.out_features, info.in_features)
        dec = decompose(cfg, get_param(gm, info.param), gram.for_role(info.role, cfg.v_sink), rank)
        new = replace_linear(gm, node, info, LowRankQuantArgs, _tensors(dec), bits=cfg.bits,
                             group_size=cfg.group_size, factor_bits=cfg.factor_bits, factor_group=cfg.factor_group)
        new.meta[LOWRANK] = {"rank": dec.rank, "bytes": dec.nbytes,
                             "bits_per_weight": dec.nbytes * 8 / (info.in_features * info.out_features)}
        if dec.order:
            self.orders[dec.order] = self.orders.get(dec.order, 0) + 1
        return dec.nbytes, {"rank": dec.rank, **({"order": dec.order} if dec.order else {})}

    def run(self, gm, ctx):
        self.orders: dict[str, int] = {}
        return super().run(gm, ctx)

    def summary(self):
        return {"budget": self.config.budget, **({"orders": dict(self.orders)} if self.orders else {})}


# buffer names, in the op's argument order after x
def _tensors(dec: Decomposition) -> dict[str, tuple[str, torch.Tensor | None]]:
    def parts(t):
        if isinstance(t, QuantizedWeight):
            return [t.packed, t.scales, t.zeros]
        return [t, None, None]

    main = [None, None, None] if dec.main is None else parts(dec.main)
    tensors = [*main, *parts(dec.at), dec.d, *parts(dec.b)]
    return {arg: (key, t) for arg, key, t in zip(LowRankQuantArgs.STORED, BUFFERS, tensors)}


@register_pass(SvdConfig)
class SvdPass(_LowRankQuantPass):
    name = "svd"


@register_pass(QThenLConfig)
class QThenLPass(_LowRankQuantPass):
    name = "q_then_l"


@register_pass(LThenQConfig)
class LThenQPass(_LowRankQuantPass):
    name = "l_then_q"


@register_pass(DamConfig)
class DamPass(_LowRankQuantPass):
    name = "dam"
