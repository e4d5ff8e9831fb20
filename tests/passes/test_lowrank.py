"""Low-rank factors (plain and whitened SVD) and the least-squares diagonal between quantized factors."""

import pytest
import torch

from sparsefx.ops.quant.format import QuantSpec
from sparsefx.passes.lowrank import fit_diagonal, svd_factors, whitened_svd_factors
from sparsefx.passes.quant import quantize_rtn


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.5 + 0.2 * torch.randn(1024, 64,
                                                                                                      generator=g)
    return x, torch.randn(37, 64, generator=g)          # odd output count


def _out_err(x, w, a, d, b):
    return (x @ (w - a @ torch.diag(d) @ b).T).pow(2).mean()


@pytest.mark.parametrize("rank", [1, 5, 32])
def test_svd_is_exact_at_full_rank_and_whitening_wins_on_output_error(rank):
    x, w = _data()
    a, d, b = svd_factors(w, 37)
    torch.testing.assert_close(a @ torch.diag(d) @ b, w, rtol=1e-4, atol=1e-4)
    plain = _out_err(x, w, *svd_factors(w, rank))
    whitened = _out_err(x, w, *whitened_svd_factors(w, x.T @ x, rank, damp=1e-6))
    assert whitened < plain


def test_fit_diagonal_recovers_and_helps_quantized_factors():
    x, w = _data(1)
    h = x.T @ x
    a, d, b = whitened_svd_factors(w, h, 32)
    torch.testing.assert_close(fit_diagonal(a @ torch.diag(d) @ b, a, b, h), d, rtol=1e-3, atol=1e-3)
    # quantize the factors (d folded out), then refit d: the output error can only go down
    spec = QuantSpec(3, 32)
    aq = quantize_rtn(a, spec).dequantize()                           # groups along the rank dimension
    bq = quantize_rtn(b, spec).dequantize()
    before = _out_err(x, w, aq, d, bq)
    after = _out_err(x, w, aq, fit_diagonal(w, aq, bq, h), bq)
    assert after < before


def test_rank_is_checked():
    with pytest.raises(ValueError, match="rank must be"):
        svd_factors(torch.randn(4, 6), 5)
