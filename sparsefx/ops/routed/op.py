"""The routed ops (DAWS / TEAL activation routing): ``tiered_linear`` (one medium tier), ``multitier_linear``
(medium tiers stored apart) and ``banded_linear`` (every tier in one banded fp16 matrix, ``format.py``) — their
schemas, fakes, default math and the one torch reference every kernel is checked against (``tier_reference``).

Each is *linear-like*: ``args[0]`` is the input ``x: [..., in]``, ``args[1]`` the weight operand, the output
``[..., out]`` (``ir.linear_nodes`` finds them beside ``aten.linear``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ...ir.annotate import register_linear_op

from .format import MAX_MEDIUMS, tier_weight


@torch.library.custom_op("sparsefx::tiered_linear", mutates_args=())
def tiered_linear(x: torch.Tensor, weight: torch.Tensor, weight_medium: torch.Tensor, bias: torch.Tensor | None,
                  t_high: float, t_low: float) -> torch.Tensor:
    """DAWS three-tier linear. Per element of ``x: [..., in]``:

    |x_i| >= t_high          -> high tier, multiplied by the full weights ``weight[:, i]``
    t_low <= |x_i| < t_high  -> medium tier, multiplied by the magnitude-pruned ``weight_medium[:, i]``
    |x_i| < t_low            -> dropped

    With ``t_high = t_low = 0`` every channel is high and the result is exactly ``F.linear(x, weight, bias)``.
    ``weight_medium`` may be stored in lower precision (e.g. fp16 beside fp32 weights); it is upcast to ``x``'s dtype
    for the math.

    Example:
        >>> w = torch.eye(3); x = torch.tensor([[3., 1., 0.1]])
        >>> torch.ops.sparsefx.tiered_linear(x, w, w * 0, None, 2.0, 0.5)
        tensor([[3., 0., 0.]])
    """
    return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)


def tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low):
    """The op's default implementation: two masked GEMMs (any device, any batch). Kernels registered per device
    (``codegen.cpu.enable_cpu_kernels``) fall back to it for the cases they do not handle."""
    return multitier_linear_math(x, weight, [weight_medium], bias, [t_high, t_low])


@tiered_linear.register_fake
def _(x, weight, weight_medium, bias, t_high, t_low):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "tiered_linear: x and weight disagree on in_features")
    torch._check(weight_medium.shape == weight.shape, lambda: "tiered_linear: weight_medium must match weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def tiered_linear_reference(x, weight, weight_medium, bias, t_high, t_low):
    """The op's semantics as plain torch (what kernels are checked against): ``tier_reference`` with the full weights
    and one medium tier."""
    return tier_reference(x, [t_high, t_low], lambda k: weight if k == 0 else weight_medium.to(x.dtype), bias)


@torch.library.custom_op("sparsefx::multitier_linear", mutates_args=())
def multitier_linear(x: torch.Tensor, weight: torch.Tensor, mediums: list[torch.Tensor], bias: torch.Tensor | None,
                     thresholds: list[float]) -> torch.Tensor:
    """DAWS with several medium tiers. ``thresholds`` descend, one more than ``mediums``; per element of x:

    |x_i| >= thresholds[0]                        -> the full weights ``weight[:, i]``
    thresholds[k+1] <= |x_i| < thresholds[k]      -> ``mediums[k][:, i]`` (pruned more the lower the tier)
    |x_i| < thresholds[-1]                        -> dropped

    With one medium this is ``tiered_linear(x, weight, mediums[0], bias, *thresholds)``; with all thresholds zero,
    ``F.linear(x, weight, bias)``. Mediums may be stored in lower precision; they are upcast for the math.

    Example:
        >>> w = torch.eye(3); x = torch.tensor([[3., 1., 0.1]])
        >>> torch.ops.sparsefx.multitier_linear(x, w, [w * 0.5], None, [2.0, 0.5])
        tensor([[3.0000, 0.5000, 0.0000]])
    """
    check_multitier_args(x, weight, mediums, thresholds)
    return multitier_linear_math(x, weight, mediums, bias, thresholds)


def tier_gemms(x, thresholds, weight_of, bias=None):
    """The default math of the tiered ops: one masked GEMM per non-empty tier, tier 0 taking ``|x| >= thresholds[0]``
    and tier k ``thresholds[k] <= |x| < thresholds[k - 1]``, each with its weight ``weight_of(k)`` (called only
    for tiers that hold some element's range)."""
    a = x.abs()
    upper = a >= thresholds[0]
    y = F.linear(torch.where(upper, x, 0.0), weight_of(0))
    for k in range(1, len(thresholds)):
        if thresholds[k] < thresholds[k - 1]:
            here = a >= thresholds[k]
            y = y + F.linear(torch.where(here & ~upper, x, 0.0), weight_of(k))
            upper = here
    return y if bias is None else y + bias


def tier_reference(x, thresholds, weight_of, bias=None):
    """The tiered ops' semantics as plain torch (what kernels are checked against): the tier of each element by
    counting the thresholds it reaches, then one product per tier with its weight ``weight_of(k)``."""
    a = x.abs()
    n = len(thresholds)
    reached = sum((a >= t).long() for t in thresholds)        # n: tier 0 (full weights) ... 0: dropped
    y = sum((x * (reached == n - k)) @ weight_of(k).T for k in range(n))
    return y if bias is None else y + bias


def multitier_linear_math(x, weight, mediums, bias, thresholds):
    """The op's default implementation: one masked GEMM per non-empty tier (any device, any batch)."""
    return tier_gemms(x, thresholds, lambda k: weight if k == 0 else mediums[k - 1].to(x.dtype), bias)


def check_multitier_args(x, weight, mediums, thresholds):
    """Raise (``torch._check``) unless the operands of ``multitier_linear`` fit together; every kernel calls it."""
    torch._check(x.shape[-1] == weight.shape[1], lambda: "multitier_linear: x and weight disagree on in_features")
    torch._check(len(thresholds) == len(mediums) + 1,
                 lambda: f"multitier_linear: {len(mediums)} mediums need {len(mediums) + 1} thresholds, "
                         f"got {len(thresholds)}")
    for wm in mediums:
        torch._check(wm.shape == weight.shape, lambda: "multitier_linear: every medium must match weight's shape")


@multitier_linear.register_fake
def _(x, weight, mediums, bias, thresholds):
    check_multitier_args(x, weight, mediums, thresholds)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def multitier_linear_reference(x, weight, mediums, bias, thresholds):
    """The op's semantics as plain torch (``tier_reference``)."""
    return tier_reference(x, thresholds, lambda k: weight if k == 0 else mediums[k - 1].to(x.dtype), bias)


@torch.library.custom_op("sparsefx::banded_linear", mutates_args=())
def banded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  thresholds: list[float]) -> torch.Tensor:
    """DAWS with nested medium tiers in one banded fp16 matrix (``format.py``). ``thresholds`` descend, 2 to 4
    of them; per element of x:

    |x_i| >= thresholds[0]                        -> all of ``weight[:, i]``
    thresholds[k] <= |x_i| < thresholds[k-1]      -> the weights of ``weight[:, i]`` whose band is >= k
    |x_i| < thresholds[-1]                        -> dropped

    ``weight``'s values (band bits included) are upcast to x's dtype for the math. With all thresholds zero this is
    ``F.linear(x, weight.to(x.dtype), bias)``.

    Example:
        >>> from sparsefx.ops.routed.format import pack_bands
        >>> w = pack_bands(torch.tensor([[1.0, 4.0], [4.0, 1.0]]), [2.0]); x = torch.tensor([[3., 1.]])
        >>> torch.ops.sparsefx.banded_linear(x, w, None, [2.0, 0.5])   # x_1 is medium: drops its weight 1.0
        tensor([[ 7.0039, 12.0117]])
    """
    check_banded_args(x, weight, thresholds)
    return banded_linear_math(x, weight, bias, thresholds)


def banded_linear_math(x, weight, bias, thresholds):
    """The op's default implementation: one masked GEMM per non-empty tier (any device, any batch)."""
    return tier_gemms(x, thresholds, lambda k: tier_weight(weight, k, x.dtype), bias)


def check_banded_args(x, weight, thresholds):
    """Raise unless the operands of ``banded_linear`` fit together; every kernel calls it."""
    torch._check(x.shape[-1] == weight.shape[1], lambda: "banded_linear: x and weight disagree on in_features")
    torch._check(weight.dtype == torch.float16,
                 lambda: f"banded_linear: the banded weight is fp16 (bands in its low bits), got {weight.dtype}")
    torch._check(2 <= len(thresholds) <= MAX_MEDIUMS + 1,
                 lambda: f"banded_linear: expected 2 to {MAX_MEDIUMS + 1} thresholds (1 to {MAX_MEDIUMS} medium "
                         f"tiers), got {len(thresholds)}")


@banded_linear.register_fake
def _(x, weight, bias, thresholds):
    check_banded_args(x, weight, thresholds)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def banded_linear_reference(x, weight, bias, thresholds):
    """The op's semantics as plain torch (``tier_reference``), the weights of tier k by comparing bands."""
    return tier_reference(x, thresholds, lambda k: tier_weight(weight, k, x.dtype), bias)


for _name in ("tiered_linear", "multitier_linear", "banded_linear"):   # linear-like (ir.linear_nodes)
    register_linear_op(getattr(torch.ops.sparsefx, _name).default)
