"""Group-wise quantization: packing, RTN bounds, GPTQ against RTN, storage accounting."""

import pytest
import torch

from sparsefx.errors import RecipeError
from sparsefx.ops.quant.format import QuantizedWeight, QuantSpec, pack, unpack
from sparsefx.passes.quant import quantize_gptq, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_density(bits):
    codes = torch.randint(0, 2 ** bits, (7, 96), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (7, 96 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits, 96), codes)


def test_int4_is_two_codes_per_byte_low_nibble_first():
    assert pack(torch.tensor([[3, 10]], dtype=torch.uint8), 4).tolist() == [[3 | (10 << 4)]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 96])
def test_rtn_error_is_within_a_step(bits, symmetric, group):
    w = torch.randn(13, 192) * torch.rand(13, 1) * 3            # odd row count, rows of different scale
    spec = QuantSpec(bits, group, symmetric)
    qw = quantize_rtn(w, spec)
    scale = qw.scales.float().repeat_interleave(group, 1)
    err = (qw.dequantize() - w).abs()
    # inside the grid an error is at most half a step; at a group's extremes the integer zero point (asymmetric)
    # or the grid's missing top code (symmetric) can add up to half a step more
    assert (err <= scale + 1e-6).all()
    assert (err <= scale * 0.5 + 1e-6).float().mean() > 0.95
    assert qw.nbytes * 8 / w.numel() == pytest.approx(spec.bits_per_weight)


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3 + torch.randn(1024, 128,
                                                                                                    generator=g)
    w = torch.randn(48, 128, generator=g)
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 32)
        err = {name: ((x @ (q.dequantize() - w).T) ** 2).mean() for name, q in
               (("rtn", quantize_rtn(w, spec)), ("gptq", quantize_gptq(w, x.T @ x, spec)))}
        assert err["gptq"] < 0.8 * err["rtn"], (bits, err)


def test_gptq_with_identity_hessian_is_rtn():
    # with H = I no error can be compensated (H^-1 is diagonal): every column rounds to nearest
    w = torch.randn(9, 64)
    spec = QuantSpec(3, 32)
    assert torch.equal(quantize_gptq(w, torch.eye(64), spec, damp=0.0).codes(), quantize_rtn(w, spec).codes())


def test_gptq_dead_inputs_quantize_to_zero():
    x = torch.randn(256, 64)
    x[:, 5] = 0
    qw = quantize_gptq(torch.randn(8, 64), x.T @ x, QuantSpec(4, 32))
    assert (qw.dequantize()[:, 5].abs() <= qw.scales.float()[:, 0] * 0.5 + 1e-6).all()


def test_restore_checks_shapes():
    qw = quantize_rtn(torch.randn(4, 64), QuantSpec(4, 32))
    again = QuantizedWeight.restore(qw.attrs(), qw.tensors())
    assert torch.equal(again.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedWeight.restore({**qw.attrs(), "shape": [4, 96]}, qw.tensors())


@pytest.mark.parametrize("kwargs, match", [({"bits": 5}, "bits"), ({"group_size": 48}, "group_size"),
                                           ({"symmetric": "yes"}, "symmetric")])
def test_bad_specs_name_the_field(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        QuantSpec(**kwargs)
    with pytest.raises(RecipeError, match="multiple of group_size"):
        quantize_rtn(torch.randn(4, 40), QuantSpec(4, 32))


@pytest.mark.parametrize("n", [1, 67, 1024, 2500])
def test_the_in_place_inverse_cholesky_is_bit_for_bit_the_out_of_place_one(n):
    from sparsefx.passes.quant import _inverse_cholesky_in_place

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n + 13, n, generator=g, dtype=torch.float64)
    H = x.T @ x + 1e-3 * torch.eye(n, dtype=torch.float64)
    H += torch.triu(torch.rand(n, n, generator=g, dtype=torch.float64), 1) * 1e-9   # the upper triangle is not read
    L = torch.linalg.cholesky(H)
    want = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    ptr = H.data_ptr()
    got = _inverse_cholesky_in_place(H)
    assert got.data_ptr() == ptr                                   # H's own memory, no second matrix
    assert torch.equal(got, want)


def test_gptq_consuming_its_hessian_gives_the_same_codes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 192, generator=g) * torch.linspace(0.1, 3, 192)
    w = torch.randn(37, 192, generator=g)
    hess = (x.T @ x).double()
    hess[:, 5] = hess[5, :] = 0                                    # a dead input
    spec = QuantSpec(3, 64)
    kept = quantize_gptq(w, hess, spec)
    consumed = quantize_gptq(w, hess.clone(), spec, consume=True)
    assert torch.equal(kept.codes(), consumed.codes()) and torch.equal(kept.scales, consumed.scales)


def test_gptq_float32_matches_float64_closely():
    """precision float32 (GPTQ's reference dtype) chooses nearly the same codes, with the same output error."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 320, generator=g) * torch.linspace(0.1, 3, 320)
    w = torch.randn(48, 320, generator=g)
    hess = (x.T @ x).double()
    spec = QuantSpec(3, 64)
    q64 = quantize_gptq(w, hess, spec)
    q32 = quantize_gptq(w, hess, spec, dtype=torch.float32)
    same = (q64.codes() == q32.codes()).float().mean().item()
    assert same > 0.97
    err = [((q.dequantize() - w) @ x.T).pow(2).sum().item() for q in (q64, q32)]
    assert err[1] == pytest.approx(err[0], rel=0.02)
    rtn = ((quantize_rtn(w, spec).dequantize() - w) @ x.T).pow(2).sum().item()
    assert err[1] < 0.95 * rtn                                      # still GPTQ (fp64: 0.89 x RTN here)


def test_gptq_large_update_runs_threaded_with_the_same_codes(monkeypatch):
    """The lazy update's GEMM runs on every thread above a size; codes equal the one-thread run's."""
    import sparsefx.passes.quant as quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 384, generator=g)
    w = torch.randn(64, 384, generator=g)
    hess = (x.T @ x).double()
    spec = QuantSpec(4, 128)
    one = quantize_gptq(w, hess, spec)                              # 64 x 256 < threshold: one thread
    calls = []
    real = quant.one_thread
    monkeypatch.setattr(quant, "_THREADED_UPDATE", 1)
    monkeypatch.setattr(quant, "one_thread", lambda: (calls.append(1), real())[1])
    threaded = quantize_gptq(w, hess, spec)
    assert len(calls) == 3                                          # the column loops only, no update GEMM
    assert torch.equal(one.codes(), threaded.codes())


def test_gptq_precision_field_and_a_failed_factorization():
    from sparsefx.errors import CalibrationError
    from sparsefx.passes.config import Recipe, resolve_recipe

    with pytest.raises(RecipeError, match="gptq.precision must be float64 or float32, got 'float16'"):
        Recipe.from_yaml("passes: [{method: gptq, bits: 4, group_size: 32, precision: float16}]")
    assert resolve_recipe("gptq-w4-g128").passes[0].precision == "float32"
    with pytest.raises(CalibrationError, match="not positive definite in float32.*raise gptq.damp.*float64"):
        quantize_gptq(torch.randn(8, 64), -torch.eye(64, dtype=torch.float64), QuantSpec(4, 32), damp=0.0,
                      dtype=torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_max_maps_each_groups_peak_onto_the_lowest_code(bits):
    """llama.cpp's Q4_0 rule: the weight of largest magnitude sits exactly on code 0 (up to the fp16 rounding of
    the scale), the step is max|w| / 2**(bits-1), and the error elsewhere stays within half a step but for the
    clamped top code."""
    w = torch.randn(11, 96) * torch.rand(11, 1) * 2
    spec = QuantSpec(bits, 32, True)
    qw = quantize_rtn(w, spec, "signed_max")
    groups = w.reshape(-1, 32)
    peak_at = groups.abs().argmax(1)
    codes = qw.codes().reshape(-1, 32)
    assert (codes.gather(1, peak_at[:, None]) == 0).all()
    step = qw.scales.float().abs().reshape(-1, 1)
    assert torch.allclose(step[:, 0], groups.abs().amax(1) / 2 ** (bits - 1), rtol=1e-3)
    err = (qw.dequantize().reshape(-1, 32) - groups).abs()
    assert (err <= step + 1e-6).all() and (err <= step * 0.5 + 1e-6).float().mean() > 0.95


def test_signed_max_beats_absmax_on_gaussian_weights_and_gptq_takes_it():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    spec = QuantSpec(4, 32, True)
    err = {r: float((quantize_rtn(w, spec, r).dequantize() - w).pow(2).mean()) for r in ("absmax", "signed_max")}
    assert err["signed_max"] < 0.9 * err["absmax"], err
    q = quantize_gptq(w, torch.eye(256), spec, damp=0.0, rule="signed_max")   # identity Hessian: GPTQ is RTN
    assert torch.equal(q.codes(), quantize_rtn(w, spec, "signed_max").codes())


def test_scale_rule_is_validated():
    from sparsefx.passes.config import Recipe

    with pytest.raises(RecipeError, match="rtn.scale: signed_max applies to symmetric"):
        Recipe.from_dict({"passes": [{"method": "rtn", "scale": "signed_max"}]})
    with pytest.raises(RecipeError, match="gptq.scale: expected one of absmax, signed_max"):
        Recipe.from_dict({"passes": [{"method": "gptq", "symmetric": True, "scale": "max"}]})
