"""The task-stratified PTQ law: its fit recovers known sensitivities and refuses what it cannot fit."""

from __future__ import annotations

import random

import pytest

from sparsefx.errors import DataError
from sparsefx.tasks.law import LawFit, Point, fit_law


def _points(law: LawFit, calib=(8, 32, 128), noise=0.0, seed=0):
    rng = random.Random(seed)
    return [Point(b, g, c, law.predict(b, g, c) + rng.gauss(0, noise))
            for b in (2, 3, 4, 8) for g in (32, 64, 192) for c in calib]


@pytest.mark.parametrize("beta, gamma, delta", [(3.0, 0.5, 0.3), (1.5, 0.2, 0.8)])
def test_fit_recovers_the_exponents_it_was_given(beta, gamma, delta):
    true = LawFit(log_a=1.2, beta=beta, gamma=gamma, delta=delta, dense=0.45, chance=0.25, r2=1, rmse=0, n=0)
    fit = fit_law(_points(true), dense=0.45, chance=0.25)
    assert fit.beta == pytest.approx(beta, rel=1e-3) and fit.gamma == pytest.approx(gamma, rel=1e-2)
    assert fit.delta == pytest.approx(delta, rel=1e-2) and fit.r2 > 0.9999 and fit.n == 36


def test_noisy_points_fit_with_their_noise_as_rmse():
    true = LawFit(log_a=1.5, beta=2.5, gamma=0.4, delta=0.2, dense=0.5, chance=0.25, r2=1, rmse=0, n=0)
    fit = fit_law(_points(true, noise=0.01, seed=3), dense=0.5, chance=0.25)
    assert fit.beta == pytest.approx(2.5, abs=0.3) and 0.003 < fit.rmse < 0.02 and fit.r2 > 0.95


def test_calibration_free_points_fit_without_delta():
    true = LawFit(log_a=1.0, beta=2.0, gamma=0.3, delta=None, dense=0.4, chance=0.2, r2=1, rmse=0, n=0)
    fit = fit_law(_points(true, calib=(None,)), dense=0.4, chance=0.2)
    assert fit.delta is None and fit.beta == pytest.approx(2.0, rel=1e-3)
    assert fit.predict(8, 32) == pytest.approx(true.predict(8, 32), abs=1e-6)
    assert 0.2 <= fit.predict(2, 192) < fit.predict(8, 32) <= 0.4    # between chance and dense


def test_what_cannot_be_fitted_is_refused():
    pts = [Point(b, 64, 32, 0.3) for b in (2, 3, 4, 8)] * 2
    with pytest.raises(DataError, match="above chance"):
        fit_law(pts, dense=0.25, chance=0.25)
    with pytest.raises(DataError, match="at least 6 points"):
        fit_law(pts[:4], dense=0.4, chance=0.25)
    with pytest.raises(DataError, match="one method at a time"):
        fit_law(pts + [Point(3, 64, None, 0.3)], dense=0.4, chance=0.25)


def test_bootstrap_intervals_cover_the_true_exponents_and_shrink_with_the_noise():
    from sparsefx.tasks.law import bootstrap_exponents

    true = LawFit(log_a=1.2, beta=3.0, gamma=0.5, delta=0.3, dense=0.45, chance=0.25, r2=1, rmse=0, n=0)
    pts = _points(true, noise=0.01, seed=5)
    wide = bootstrap_exponents(pts, [0.01] * len(pts), 0.45, 0.005, 0.25, n=60, seed=1)
    narrow = bootstrap_exponents(pts, [0.001] * len(pts), 0.45, 0.0005, 0.25, n=60, seed=1)
    for k, v in (("beta", 3.0), ("gamma", 0.5), ("delta", 0.3)):
        lo, hi = wide[k]
        assert lo < v < hi, (k, wide[k])
        assert narrow[k][1] - narrow[k][0] < 0.5 * (hi - lo)
    rtn = [Point(p.bits, p.group_size, None, p.acc) for p in pts if p.calib_samples == 32]
    ci = bootstrap_exponents(rtn, [0.01] * len(rtn), 0.45, 0.005, 0.25, n=40)
    assert set(ci) == {"beta", "gamma"}
    with pytest.raises(ValueError, match="standard errors"):
        bootstrap_exponents(rtn, [0.01], 0.45, 0.0, 0.25)
