"""The banded fp16 layout: every stored weight is the nearest fp16 number carrying its band in the low bits."""

import pytest
import torch

from sparsefx.ops.routed.format import MAX_MEDIUMS, band_of, pack_bands, tier_weight

# every finite non-negative fp16 bit pattern, and its value
_ALL = torch.arange(0, 0x7C00, dtype=torch.int32)
_ALL_VALUES = _ALL.to(torch.int16).view(torch.float16).double()


def _cuts(w, shares):
    return [float(w.abs().flatten().kthvalue(max(1, int(s * w.numel()))).values) for s in shares]


@pytest.mark.parametrize("n_cuts", range(1, MAX_MEDIUMS + 1))
@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0])
def test_bands_count_the_cuts_reached_and_values_are_the_nearest_allowed(n_cuts, scale):
    w = torch.randn(37, 53) * scale
    w[0, :5] = 0.0
    cuts = _cuts(w, [(k + 1) / (n_cuts + 1) for k in range(n_cuts)])
    banded = pack_bands(w, cuts)
    assert banded.dtype == torch.float16 and banded.shape == w.shape
    band = band_of(banded)
    expected = sum((w.abs() >= c).to(torch.int16) for c in cuts)
    assert torch.equal(band, torch.where(w == 0, 0, expected).to(band.dtype))
    values = banded.double()
    assert torch.equal(values[0, :5], torch.zeros(5, dtype=torch.float64))          # zeros stay exact
    # signs kept; only fp16 subnormals may round to zero (4 subnormal steps apart with the band bits fixed)
    assert ((values == 0) | (torch.sign(values) == torch.sign(w.double()))).all()
    assert (values != 0)[w.abs() >= 2 ** -14].all()
    # brute force: no fp16 number with the same band bits lies closer to the weight
    flat_w, flat_b = w.flatten().double().abs(), band.flatten()
    for i in torch.randint(0, w.numel(), (200,)).tolist():
        allowed = _ALL_VALUES[(_ALL & 3) == int(flat_b[i])]
        best = (allowed - flat_w[i]).abs().min()
        assert (values.flatten()[i].abs() - flat_w[i]).abs() == best


def test_precision_is_within_two_fp16_ulps_in_the_normal_range():
    w = torch.randn(64, 257) * 0.02
    banded = pack_bands(w, _cuts(w, [0.25, 0.5, 0.75]))
    normal = w.abs() > 2 ** -14
    rel = ((banded.float() - w).abs() / w.abs())[normal]
    assert float(rel.max()) <= 2 ** -9 * 1.0001      # 2 ulps of a 10-bit mantissa


def test_tier_weights_nest():
    w = torch.randn(29, 31)
    banded = pack_bands(w, _cuts(w, [0.3, 0.6, 0.8]))
    tiers = [tier_weight(banded, k) for k in range(4)]
    assert torch.equal(tiers[0], banded.float())
    for k in range(1, 4):
        assert torch.equal(tiers[k] != 0, (tiers[k - 1] != 0) & (band_of(banded) >= k))
    for k, share in zip(range(1, 4), (0.7, 0.4, 0.2)):
        assert (tiers[k] != 0).float().mean().item() == pytest.approx(share, abs=0.01)


def test_bad_inputs_are_named():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="1 to 3 rising cuts"):
        pack_bands(w, [0.5, 0.2])
    with pytest.raises(ValueError, match="1 to 3 rising cuts"):
        pack_bands(w, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="beyond fp16's range.*layout: separate"):
        pack_bands(w * 1e5, [0.5])
    with pytest.raises(ValueError, match="fp16"):
        band_of(w)
