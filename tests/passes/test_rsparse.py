import pytest
import torch

from sparsefx.errors import RecipeError
from sparsefx.ir import verify
from sparsefx.ops.rsparse.op import sparse_lowrank_linear_reference
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe, config_from_dict
from sparsefx.passes.rsparse import lowrank_factors
from sparsefx.pipeline import compress

op = torch.ops.sparsefx.sparse_lowrank_linear


@pytest.mark.parametrize("shape, out_f, rank", [((1, 1, 7), 5, 1), ((3, 13, 31), 17, 4), ((2, 64), 96, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_op_matches_reference(shape, out_f, rank, bias):
    x, w = torch.randn(shape), torch.randn(out_f, shape[-1])
    u, v = torch.randn(out_f, rank), torch.randn(rank, shape[-1])
    b = torch.randn(out_f) if bias else None
    for t in (0.3, 1.0, 5.0):
        torch.testing.assert_close(op(x, w, u, v, b, t), sparse_lowrank_linear_reference(x, w, u, v, b, t),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(op(x, w, u, v, b, 0.0), torch.nn.functional.linear(x, w, b))  # t = 0 is exactly dense


def test_op_registration_checks():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    torch.library.opcheck(op, (x, w, torch.randn(4, 2), torch.randn(2, 8), None, 0.5))


def test_lowrank_factors_are_the_best_rank_r_approximation():
    w = torch.randn(23, 11)
    u, v = lowrank_factors(w, 4)
    s = torch.linalg.svdvals(w.double())
    # Eckart-Young: the Frobenius error of the best rank-4 approximation is the norm of the dropped singular values
    assert float((w - u @ v).double().norm()) == pytest.approx(float(s[4:].norm()), rel=1e-4)
    full_u, full_v = lowrank_factors(w, 11)
    torch.testing.assert_close(full_u @ full_v, w, rtol=1e-4, atol=1e-4)


def test_invalid_values():
    with pytest.raises(RecipeError, match=r"rsparse\.rank_share"):
        config_from_dict({"method": "rsparse", "rank_share": 1.0})
    with pytest.raises(RecipeError, match=r"rsparse\.sparsity"):
        config_from_dict({"method": "rsparse", "sparsity": -0.2})


def test_lowrank_branch_recovers_dropped_channels_of_a_low_rank_weight():
    # Real weights have decaying spectra (random ones do not); on such a weight the rank-r branch carries most of
    # what the dropped channels contribute.
    torch.manual_seed(0)
    w = torch.randn(96, 6) @ torch.randn(6, 64) + 0.05 * torch.randn(96, 64)
    x = torch.randn(200, 64)
    t = float(x.abs().quantile(0.6))
    u, v = lowrank_factors(w, 6)
    ref = x @ w.T
    dropped = op(x, w, torch.zeros_like(u), v, None, t)
    recovered = op(x, w, u, v, None, t)
    assert (recovered - ref).norm() < 0.1 * (dropped - ref).norm()


def test_pass_hits_target_lowers_and_generates(arch, tokens):
    calib = torch.randint(0, 256, (8, 32))
    model = tiny_model(arch)
    result = compress(model, Recipe.from_yaml("passes: [{method: rsparse, sparsity: 0.5, rank_share: 0.3}]"),
                      calibration=calib, progress=False)
    report = result.reports[-1]
    assert report.details["effective_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert all(p["rank"] >= 1 for p in report.details["per_param"].values())
    verify(result.graph_module)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(tokens), model(tokens).logits, rtol=0, atol=0)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "SparseLowRankLinear"
    out = model.generate(tokens[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
