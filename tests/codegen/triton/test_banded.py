"""Triton GEMV over the banded layout against the reference; CPU runs it in the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sparsefx.ops.routed.triton import banded_gemv, triton_banded_linear  # noqa: E402
from sparsefx.ops.routed.format import pack_bands  # noqa: E402
from sparsefx.ops.routed.op import banded_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 x: the products are exact on both sides, only the summation order differs (K <= 257 terms); fp16 x: the
# reference rounds its fp16 matmul output, so allow a few fp16 ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


def _case(k, n, n_mediums, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    cuts = [float(w.abs().flatten().kthvalue(max(1, int((j + 1) / (n_mediums + 1) * w.numel()))).values)
            for j in range(n_mediums)]
    return torch.randn(k, generator=g), pack_bands(w, cuts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,n", [(67, 45), (128, 1), (1, 33), (257, 131)])
@pytest.mark.parametrize("thresholds", [[1.2, 0.8, 0.5, 0.2], [1.0, 0.4], [0.9, 0.9, 0.3], [0.0, 0.0, 0.0]])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4},
                                    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4},
                                    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 64, "num_warps": 4}])   # wide
def test_gemv_matches_reference(k, n, dtype, thresholds, config):
    x, banded = _case(k, n, len(thresholds) - 1, seed=k * n + len(thresholds))
    x, banded = x.to(DEVICE, dtype), banded.to(DEVICE)
    out = torch.full((n,), float("nan"), device=DEVICE)             # poisoned: every output must be written
    y = banded_gemv(x, banded.t(), thresholds, config=config, out=out)
    ref = banded_linear_reference(x[None].float(), banded, None, thresholds)[0]
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("lead", [(1, 1), (2, 7)])
def test_op_decodes_through_the_kernel_and_falls_back_for_batches(lead):
    x, banded = _case(96, 40, 3, seed=5)
    x = torch.randn(*lead, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.randn(40).to(DEVICE)
    ts = [1.3, 0.7, 0.4, 0.2]
    banded = banded.to(DEVICE)
    ref = banded_linear_reference(x, banded, bias, ts)
    torch.testing.assert_close(triton_banded_linear(x, banded, bias, ts), ref, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.sparsefx.triton_banded_linear, (x, banded, bias, ts))


def test_bad_operands_are_named():
    x, banded = _case(16, 8, 1, seed=0)
    with pytest.raises(ValueError, match="2 to 4 thresholds"):
        banded_gemv(x.to(DEVICE), banded.t().to(DEVICE), [0.5])
    with pytest.raises(ValueError, match="fp16"):
        banded_gemv(x.to(DEVICE), banded.t().float().to(DEVICE), [0.5, 0.1])
