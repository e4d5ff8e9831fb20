"""The task-stratified PTQ scaling law: how a category's accuracy falls with bits, group size and calibration size.

Zhou et al., "Task-Stratified Knowledge Scaling Laws for Post-Training Quantized LLMs" (arXiv 2508.18609) fit one
power law per knowledge category (memorization, application, reasoning) over model size N, bit width b, group size
g and calibration set size c. We have one model (N fixed), so N drops out, and we write the law so that it stays
between the dense accuracy and chance, which 2-bit models fall to:

    acc(b, g, c) = r + (d - r) * exp(-L),     L = A * b^-beta * g^gamma * c^-delta

``d`` is the dense model's accuracy on the category, ``r`` its chance level (both measured, not fitted); ``L`` is
the "loss of knowledge", a product of powers whose exponents are the sensitivities the paper compares: ``beta``
to precision, ``gamma`` to group size (coarser groups lose more), ``delta`` to calibration data. RTN uses no
calibration data, so its law has no ``delta``. Fitted by least squares on accuracy (LBFGS over ``log A`` and the
exponents, started from a log-linear fit); quality as R² and RMSE on the fitted points.

Example:
    >>> pts = [Point(b, g, c, acc) for b, g, c, acc in rows]        # doctest: +SKIP
    >>> fit = fit_law(pts, dense=0.45, chance=0.3)                   # doctest: +SKIP
    >>> fit.beta, fit.r2                                              # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import DataError


@dataclass(frozen=True)
class Point:
    bits: float
    group_size: float
    calib_samples: float | None      # None: a calibration-free method (RTN)
    acc: float


@dataclass
class LawFit:
    log_a: float
    beta: float
    gamma: float
    delta: float | None              # None when the points have no calibration axis
    dense: float
    chance: float
    r2: float
    rmse: float
    n: int

    def loss(self, bits, group_size, calib_samples=None) -> float:
        val = self.log_a - self.beta * math.log(bits) + self.gamma * math.log(group_size)
        if self.delta is not None and calib_samples is not None:
            val -= self.delta * math.log(calib_samples)
        return math.exp(val)

    def predict(self, bits, group_size, calib_samples=None) -> float:
        return self.chance + (self.dense - self.chance) * math.exp(-self.loss(bits, group_size, calib_samples))

    def row(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _features(points: list[Point], with_calib: bool) -> torch.Tensor:
    cols = [[1.0, -math.log(p.bits), math.log(p.group_size)] + ([-math.log(p.calib_samples)] if with_calib else [])
            for p in points]
    return torch.tensor(cols, dtype=torch.float64)


def fit_law(points: list[Point], dense: float, chance: float, steps: int = 200) -> LawFit:
    """Fit ``acc = r + (d - r) exp(-A b^-beta g^gamma c^-delta)`` to ``points`` (see the module docstring)."""
    if not dense > chance:
        raise DataError(f"the dense accuracy ({dense:.3f}) must be above chance ({chance:.3f}) for the law to "
                        "describe a loss; this category carries no signal on this model")
    with_calib = all(p.calib_samples is not None for p in points)
    if not with_calib and any(p.calib_samples is not None for p in points):
        raise DataError("fit one method at a time: some points have a calibration size and some (RTN) do not")
    n_par = 4 if with_calib else 3
    if len(points) < n_par + 2:
        raise DataError(f"fitting {n_par} parameters needs at least {n_par + 2} points, got {len(points)}")
    X = _features(points, with_calib)
    y = torch.tensor([p.acc for p in points], dtype=torch.float64)
    span = dense - chance
    # start: log-linear least squares on L = -log((acc - r) / (d - r)), clipped into (0, inf)
    frac = ((y - chance) / span).clamp(1e-3, 1 - 1e-3)
    theta0 = torch.linalg.lstsq(X, torch.log(-torch.log(frac)).unsqueeze(1)).solution.squeeze(1)
    theta = theta0.clone().requires_grad_(True)

    def predict(t):
        return chance + span * torch.exp(-torch.exp(X @ t))

    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((predict(theta) - y) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        if not torch.isfinite(theta).all():
            theta = theta0
        pred = predict(theta)
        sse = float(((pred - y) ** 2).sum())
        sst = float(((y - y.mean()) ** 2).sum())
    t = theta.detach().tolist()
    return LawFit(log_a=t[0], beta=t[1], gamma=t[2], delta=t[3] if with_calib else None, dense=dense,
                  chance=chance, r2=1 - sse / sst if sst > 0 else float("nan"), rmse=math.sqrt(sse / len(points)),
                  n=len(points))


def bootstrap_exponents(points: list[Point], stderr: list[float], dense: float, dense_stderr: float,
                        chance: float, n: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % intervals of the fitted exponents (``beta``, ``gamma``, ``delta``) by a parametric bootstrap: every
    point's accuracy (and the dense reference) redrawn from a normal with its standard error, the law refitted,
    the 2.5th and 97.5th percentiles taken. Redraws whose fit fails (dense at or below chance) are left out; an
    exponent whose refits mostly fail gets no interval.

    Example:
        >>> ci = bootstrap_exponents(pts, [0.03] * len(pts), 0.45, 0.01, 0.25)   # doctest: +SKIP
        >>> ci["beta"]                                                          # doctest: +SKIP
        (2.1, 3.4)
    """
    if len(stderr) != len(points):
        raise ValueError(f"{len(points)} points but {len(stderr)} standard errors")
    gen = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {"beta": [], "gamma": [], "delta": []}
    for _ in range(n):
        noise = torch.randn(len(points) + 1, generator=gen, dtype=torch.float64).tolist()
        pts = [Point(p.bits, p.group_size, p.calib_samples, p.acc + se * z)
               for p, se, z in zip(points, stderr, noise)]
        try:
            fit = fit_law(pts, dense=dense + dense_stderr * noise[-1], chance=chance)
        except DataError:
            continue
        for k, vals in draws.items():
            v = getattr(fit, k)
            if v is not None and math.isfinite(v):
                vals.append(v)
    out = {}
    for k, vals in draws.items():
        if len(vals) >= n // 2:
            q = torch.quantile(torch.tensor(vals, dtype=torch.float64), torch.tensor([0.025, 0.975],
                                                                                    dtype=torch.float64))
            out[k] = (round(float(q[0]), 4), round(float(q[1]), 4))
    return out

