"""Triton GEMV of multitier_linear (medium tiers stored apart) against the reference; CPU runs it in the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sparsefx.ops.routed.triton import multitier_gemv, triton_multitier_linear  # noqa: E402
from sparsefx.ops.routed.op import multitier_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 x: exact products on both sides, only the summation order differs (K <= 257 terms); fp16 x: the reference
# rounds its fp16 matmul output, so allow a few fp16 ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


def _case(k, n, n_mediums, seed, medium_dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mediums = [(w * (w.abs() > 0.4 * (j + 1))).to(medium_dtype) for j in range(n_mediums)]  # pruned more and more
    return torch.randn(k, generator=g), w, mediums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("medium_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,n", [(67, 45), (128, 1), (1, 33), (257, 131)])
@pytest.mark.parametrize("thresholds", [[1.2, 0.8, 0.5, 0.2], [1.0, 0.4], [0.9, 0.9, 0.3], [0.0, 0.0, 0.0]])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4},
                                    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 64, "num_warps": 4}])   # wide
def test_gemv_matches_reference(k, n, dtype, medium_dtype, thresholds, config):
    x, w, mediums = _case(k, n, len(thresholds) - 1, k * n + len(thresholds), medium_dtype)
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    mediums = [m.to(DEVICE) for m in mediums]
    out = torch.full((n,), float("nan"), device=DEVICE)             # poisoned: every output must be written
    y = multitier_gemv(x, w.t(), [m.t() for m in mediums], thresholds, config=config, out=out)
    ref = multitier_linear_reference(x[None].float(), w.float(), mediums, None, thresholds)[0]
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("lead, n_mediums", [((1, 1), 3), ((2, 7), 3), ((1, 1), 4)])   # 4 mediums: default math
def test_op_decodes_through_the_kernel_and_falls_back(lead, n_mediums):
    _, w, mediums = _case(96, 40, n_mediums, 5, torch.float16)
    x = torch.randn(*lead, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w, mediums, bias = w.to(DEVICE), [m.to(DEVICE) for m in mediums], torch.randn(40).to(DEVICE)
    ts = [1.3, 0.7, 0.4, 0.2, 0.1][:n_mediums + 1]
    ref = multitier_linear_reference(x, w, mediums, bias, ts)
    torch.testing.assert_close(triton_multitier_linear(x, w, mediums, bias, ts), ref, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.sparsefx.triton_multitier_linear, (x, w, mediums, bias, ts))


def test_bad_operands_are_named():
    x, w, mediums = _case(16, 8, 2, 0, torch.float32)
    with pytest.raises(ValueError, match="one threshold more"):
        multitier_gemv(x.to(DEVICE), w.t().to(DEVICE), [m.t().to(DEVICE) for m in mediums], [0.5, 0.1])
    with pytest.raises(ValueError, match=r"\[in, out\]"):
        multitier_gemv(x.to(DEVICE), w.t().to(DEVICE), [mediums[0].to(DEVICE)], [0.5, 0.1])
