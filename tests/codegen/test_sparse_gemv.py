"""The CPU activation-sparse GEMV against its torch reference on fresh random inputs, odd shapes included."""

import pytest
import torch

from sparsefx.ops.routed.cpu import (extension, banded_gemv, banded_gemv_reference, cpp_banded_linear, cpp_multitier_linear, cpp_tiered_linear_packed, cpu_supports_kernels, multitier_gemv, multitier_gemv_reference, pack_medium_rows, sparse_gemv, sparse_gemv_reference, tiered_gemv, tiered_gemv_packed, tiered_gemv_reference, unpack_medium)
from sparsefx.ops.routed.format import pack_bands
from sparsefx.ops.routed.op import tiered_linear_reference

needs_kernel = pytest.mark.skipif(not cpu_supports_kernels(), reason="the C++ kernel needs AVX2/FMA/F16C")


@needs_kernel
def test_kernel_builds():
    assert extension() is not None


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(1, 1), (7, 13), (31, 9), (576, 1536), (1536, 576), (97, 4099),
                                         (263, 2053), (29, 16387)])  # > 16384 outputs: column-block path
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_reference(in_f, out_f, sparsity):
    x, wt = torch.randn(in_f), torch.randn(in_f, out_f)
    thr = float(x.abs().quantile(sparsity)) if sparsity > 0 else 0.0
    if sparsity == 1.0:
        thr = float(x.abs().max()) * 1.01  # nothing kept: y must be exactly zero
    ref = sparse_gemv_reference(x, wt, thr)
    got = sparse_gemv(x, wt, thr)
    # fp32 sums in a different order: error grows like sqrt(kept) * |x| * |w| * eps
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))
    if sparsity == 1.0:
        assert torch.equal(got, torch.zeros(out_f))


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(1, 1), (31, 9), (576, 1536), (1536, 576), (263, 2053), (13, 16411)])
@pytest.mark.parametrize("q_low, q_high", [(0.3, 0.5), (0.0, 0.8), (0.5, 0.5), (0.9, 1.0)])
@pytest.mark.parametrize("medium_dtype", [torch.float32, torch.float16])
def test_two_tiers_match_reference(in_f, out_f, q_low, q_high, medium_dtype):
    x, wt, wmt = torch.randn(in_f), torch.randn(in_f, out_f), torch.randn(in_f, out_f, dtype=medium_dtype)
    a = x.abs()
    t_low = float(a.quantile(q_low)) if q_low > 0 else 0.0
    t_high = float(a.quantile(q_high)) if q_high < 1 else float(a.max()) * 1.01
    got = tiered_gemv(x, wt, wmt, t_high, t_low)
    ref = tiered_gemv_reference(x, wt, wmt, t_high, t_low)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))  # summation order only


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(1, 1), (31, 9), (576, 1536), (1536, 576), (263, 2053), (13, 16411)])
@pytest.mark.parametrize("quantiles", [(0.9, 0.7, 0.5, 0.3), (0.8, 0.8, 0.4, 0.0), (0.5, 0.2), (1.0, 0.0, 0.0)])
def test_multitier_matches_reference(in_f, out_f, quantiles):
    x, wt = torch.randn(in_f), torch.randn(in_f, out_f)
    a = x.abs()
    thresholds = [float(a.max()) * 1.01 if q == 1 else float(a.quantile(q)) if q > 0 else 0.0 for q in quantiles]
    # medium tiers pruned more the lower they are, alternating fp32 and fp16 storage
    wmts = [(wt * (wt.abs() > 0.4 * k)).to(torch.float16 if k % 2 else torch.float32)
            for k in range(1, len(thresholds))]
    got = multitier_gemv(x, wt, wmts, thresholds)
    ref = multitier_gemv_reference(x, wt, wmts, thresholds)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))  # summation order only
    if len(thresholds) == 3:  # and with two tiers it is the tiered GEMV
        torch.testing.assert_close(multitier_gemv(x, wt, wmts[:1], thresholds[:2]),
                                   tiered_gemv(x, wt, wmts[0], *thresholds[:2]), rtol=1e-5, atol=1e-5)


def _banded_t(in_f, out_f, n_mediums, gen):
    """A banded matrix for a random ``[out, in]`` weight, stored transposed ([in, out])."""
    w = torch.randn(out_f, in_f, generator=gen)
    shares = [(k + 1) / (n_mediums + 1) for k in range(n_mediums)]
    cuts = [float(w.abs().flatten().kthvalue(max(1, int(s * w.numel()))).values) for s in shares]
    return pack_bands(w, cuts).t().contiguous()


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(1, 1), (31, 9), (17, 23), (576, 1536), (1536, 576), (263, 2053),
                                         (13, 16411)])   # outputs not a multiple of 16 or 8; > 16384: column blocks
@pytest.mark.parametrize("quantiles", [(0.9, 0.7, 0.5, 0.3), (0.8, 0.8, 0.4, 0.0), (0.5, 0.2), (1.0, 0.0, 0.0),
                                       (0.0, 0.0, 0.0, 0.0)])
def test_banded_matches_reference(in_f, out_f, quantiles):
    g = torch.Generator().manual_seed(in_f * 7 + out_f + len(quantiles))
    x = torch.randn(in_f, generator=g)
    wt = _banded_t(in_f, out_f, len(quantiles) - 1, g)
    a = x.abs()
    thresholds = [float(a.max()) * 1.01 if q == 1 else float(a.quantile(q)) if q > 0 else 0.0 for q in quantiles]
    got = banded_gemv(x, wt, thresholds)
    ref = banded_gemv_reference(x, wt, thresholds)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))  # summation order only
    if not any(thresholds):   # every channel in the full tier: the dense product of the stored fp16 values
        torch.testing.assert_close(got, x @ wt.float(), rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))


def test_banded_gemv_rejects_bad_operands():
    wt = pack_bands(torch.randn(3, 4), [0.5]).t().contiguous()
    with pytest.raises(ValueError, match="2 to 4 thresholds"):
        banded_gemv(torch.randn(4), wt, [0.5])
    with pytest.raises(ValueError, match="fp16"):
        banded_gemv(torch.randn(4), wt.float(), [0.5, 0.2])


@needs_kernel
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
def test_cpp_registered_op_computes_the_banded_linear(lead):
    from sparsefx.ops.routed.op import banded_linear_math

    op = cpp_banded_linear()
    assert op is not None, "the C++ extension must build on this CPU (AVX2/FMA/F16C)"
    g = torch.Generator().manual_seed(11 + sum(lead))
    w = _banded_t(67, 41, 2, g).t()          # [out, in] over transposed storage
    x, bias = torch.randn(*lead, 67, generator=g), torch.randn(41, generator=g)
    for ts in ([1.2, 0.6, 0.2], [0.9, 0.9, 0.3], [0.0, 0.0, 0.0]):
        ref = banded_linear_math(x, w, bias, ts)
        for ww in (w, w.contiguous()):       # transposed and plain storage
            torch.testing.assert_close(op(x, ww, bias, ts), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="expected 2 to 4 thresholds"):
        op(x, w, None, [0.5])


def test_multitier_gemv_rejects_mismatched_thresholds():
    with pytest.raises(ValueError, match="one threshold more than mediums"):
        multitier_gemv(torch.randn(4), torch.randn(4, 3), [torch.randn(4, 3)], [0.5])


@needs_kernel
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
def test_cpp_registered_op_computes_the_multitier_linear(lead):
    from sparsefx.ops.routed.op import multitier_linear_math

    op = cpp_multitier_linear()
    assert op is not None, "the C++ extension must build on this CPU (AVX2/FMA/F16C)"
    g = torch.Generator().manual_seed(7 + sum(lead))
    w = torch.randn(41, 67, generator=g)
    mediums = [w * (w.abs() > 0.5), (w * (w.abs() > 1.0)).half()]
    x, bias = torch.randn(*lead, 67, generator=g), torch.randn(41, generator=g)
    for ts in ([1.2, 0.6, 0.2], [0.9, 0.9, 0.3], [0.0, 0.0, 0.0]):
        ref = multitier_linear_math(x, w, mediums, bias, ts)
        transposed = [m.t().contiguous().t() for m in mediums]
        for ww, mm in ((w, mediums), (w.t().contiguous().t(), transposed)):  # plain and transposed storage
            torch.testing.assert_close(op(x, ww, mm, bias, ts), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="2 mediums need 3 thresholds, got 2"):
        op(x, w, mediums, None, [0.5, 0.1])


@needs_kernel
def test_zero_threshold_keeps_every_nonzero_channel_and_equals_dense():
    x, w = torch.randn(129), torch.randn(77, 129)
    x[::3] = 0.0
    torch.testing.assert_close(sparse_gemv(x, w.t().contiguous(), 0.0), w @ x, rtol=1e-4, atol=1e-4)


def test_fallback_for_other_dtypes_and_bad_shapes():
    x, wt = torch.randn(16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    torch.testing.assert_close(sparse_gemv(x, wt, 0.5), sparse_gemv_reference(x, wt, 0.5))
    with pytest.raises(ValueError, match=r"x: \[in\] and wt: \[in, out\]"):
        sparse_gemv(torch.randn(3), torch.randn(4, 5), 0.1)


@needs_kernel
def test_fp16_medium_rows_are_read_as_stored():
    # the medium tier alone (t_high above every |x|): the kernel must use the fp16 values as they are, not a copy
    # rounded differently; compare with fp64 math on the same fp16 weights
    x, wmt = torch.randn(301), torch.randn(301, 1031).half()
    got = tiered_gemv(x, torch.randn(301, 1031), wmt, float(x.abs().max()) * 2, 0.0)
    torch.testing.assert_close(got.double(), x.double() @ wmt.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
@pytest.mark.parametrize("medium_dtype", [torch.float32, torch.float16])
def test_cpp_registered_op_computes_the_tiered_linear(lead, medium_dtype):
    # sparsefx_cpu::tiered_linear (what the backend lowers to on CPU): one token on transposed storage takes the
    # kernel, everything else the op's default math; both equal sparsefx::tiered_linear's reference
    from sparsefx.ops.routed.cpu import cpp_tiered_linear
    from sparsefx.ops.routed.op import tiered_linear_math

    op = cpp_tiered_linear()
    assert op is not None, "the C++ extension must build on this CPU (AVX2/FMA/F16C)"
    g = torch.Generator().manual_seed(sum(lead))
    w = torch.randn(37, 67, generator=g)
    wm = (w * (torch.rand(37, 67, generator=g) > 0.5)).to(medium_dtype)
    x, bias = torch.randn(*lead, 67, generator=g), torch.randn(37, generator=g)
    for t_high, t_low in ((1.0, 0.4), (0.7, 0.7), (0.0, 0.0)):
        ref = tiered_linear_math(x, w, wm, bias, t_high, t_low)
        for ww, wwm in ((w, wm), (w.t().contiguous().t(), wm.t().contiguous().t())):   # plain and transposed storage
            torch.testing.assert_close(op(x, ww, wwm, bias, t_high, t_low), ref, rtol=1e-5, atol=1e-5)
    assert op(x, w, wm, None, 1.0, 0.4).shape == (*lead, 37)


def _pruned(in_f, out_f, density, dtype=torch.float32):
    wmt = torch.randn(in_f, out_f) * (torch.rand(in_f, out_f) < density)
    return wmt.to(dtype)


@pytest.mark.parametrize("in_f, out_f", [(1, 1), (5, 8), (9, 17), (33, 130)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_medium_round_trips_and_counts_each_rows_values(in_f, out_f, density):
    wmt = _pruned(in_f, out_f, density)
    mask, values, offsets = pack_medium_rows(wmt)
    assert mask.dtype == torch.uint8 and mask.shape == (in_f, -(-out_f // 8))
    assert offsets.tolist() == [0] + (wmt != 0).sum(1).cumsum(0).tolist()
    assert values.numel() == int(offsets[-1]) + 8 and torch.equal(values[-8:], torch.zeros(8))
    assert torch.equal(unpack_medium(mask, values, offsets, out_f), wmt)


@needs_kernel
@pytest.mark.parametrize("in_f, out_f", [(1, 1), (31, 9), (576, 1536), (1536, 576), (263, 2053), (13, 16411)])
@pytest.mark.parametrize("q_low, q_high", [(0.3, 0.5), (0.0, 0.8), (0.9, 1.0)])
@pytest.mark.parametrize("medium_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.35, 0.65])
def test_packed_medium_tier_matches_reference(in_f, out_f, q_low, q_high, medium_dtype, density):
    x, wt = torch.randn(in_f), torch.randn(in_f, out_f)
    wmt = _pruned(in_f, out_f, density, medium_dtype)
    a = x.abs()
    t_low = float(a.quantile(q_low)) if q_low > 0 else 0.0
    t_high = float(a.quantile(q_high))
    got = tiered_gemv_packed(x, wt, *pack_medium_rows(wmt), t_high, t_low)
    ref = tiered_gemv_reference(x, wt, wmt, t_high, t_low)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, in_f ** 0.5))


@needs_kernel
def test_packed_kernel_rejects_a_mask_of_the_wrong_width():
    x, wt = torch.randn(9), torch.randn(9, 17)
    mask, values, offsets = pack_medium_rows(_pruned(9, 16, 0.5))
    with pytest.raises(ValueError, match="ceil"):
        tiered_gemv_packed(x, wt, mask, values, offsets, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="padding"):   # values cut short: the C++ check, not an overread
        extension().tiered_gemv_packed(x, wt, *pack_medium_rows(_pruned(9, 17, 0.5))[:1], torch.zeros(3),
                                        pack_medium_rows(_pruned(9, 17, 1.0))[2], 1.0, 0.5)


@needs_kernel
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
def test_cpp_packed_op_computes_the_tiered_linear(lead):
    in_f, out_f = 67, 45
    w, b = torch.randn(in_f, out_f).t(), torch.randn(out_f)
    wm = _pruned(in_f, out_f, 0.5).t()
    x = torch.randn(*lead, in_f)
    a = x.abs().flatten()
    t_high, t_low = float(a.quantile(0.7)), float(a.quantile(0.3))
    got = cpp_tiered_linear_packed()(x, w, wm, *pack_medium_rows(wm.t()), b, t_high, t_low)
    torch.testing.assert_close(got, tiered_linear_reference(x, w, wm, b, t_high, t_low), rtol=1e-4, atol=1e-4)
