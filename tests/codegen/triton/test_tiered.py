"""Triton tiered linear (GEMV, union GEMM, the op) against the reference; CPU runs them in the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sparsefx.ops.triton_support import available  # noqa: E402
from sparsefx.ops.routed.triton import (DENSE_ABOVE, block_layout, default_gemv_config, kept_channels, tiered_gemm, tiered_gemv, triton_tiered_linear)
from sparsefx.ops.routed.op import tiered_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: products are exact in both, only the summation order differs (K <= 300 terms); fp16 inputs: both sides
# accumulate in fp32 but the reference's matmul rounds its fp16 output, so allow a few fp16 ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


def _case(k, n, dtype, seed, medium_dtype=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    wm = w * (torch.rand(n, k, generator=g) > 0.5)
    x = torch.randn(k, generator=g)
    return (x.to(DEVICE, dtype), w.to(DEVICE, dtype), wm.to(DEVICE, medium_dtype or dtype))


def test_runs_here():
    assert available(DEVICE), "conftest sets TRITON_INTERPRET=1 on CPU; the kernels must be runnable in tests"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,n", [(67, 45), (128, 1), (1, 33), (257, 131)])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4},
                                    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4},
                                    # kept channels listed on the device, the list split between programs
                                    {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4, "GATHER": 1},
                                    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "GATHER": 1}])
def test_gemv_matches_reference(k, n, dtype, config):
    x, w, wm = _case(k, n, dtype, seed=k * n)
    t_high, t_low = 1.0, 0.4
    out = torch.full((n,), float("nan"), device=DEVICE)             # poisoned: every output must be written
    y = tiered_gemv(x, w.t(), wm.t(), t_high, t_low, config=config, out=out)
    ref = tiered_linear_reference(x[None].float(), w.float(), wm.float(), None, t_high, t_low)[0]
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    # one tier (TEAL): only |x| >= t_high counts, also when the kernel lists the kept channels itself
    y = tiered_gemv(x, w.t(), None, t_high, t_low, config=config, out=torch.full((n,), float("nan"), device=DEVICE))
    ref = w.float() @ torch.where(x.float().abs() >= t_high, x.float(), 0.0)
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])


def test_every_gemv_config_the_tuner_tries_computes_the_same():
    # wide tiles with more K splits than K blocks included: k_chunks leaves no split empty or overlapping
    from sparsefx.ops.routed.triton import gemv_configs

    x, w, wm = _case(203, 301, torch.float16, seed=5)
    ref = tiered_linear_reference(x[None].float(), w.float(), wm.float(), None, 1.0, 0.4)[0]
    for cfg in gemv_configs():
        out = torch.full((301,), float("nan"), device=DEVICE)
        y = tiered_gemv(x, w.t(), wm.t(), 1.0, 0.4, config=cfg, out=out)
        torch.testing.assert_close(y.float(), ref, **TOL[torch.float16], msg=lambda m, c=cfg: f"{c}: {m}")


@pytest.mark.parametrize("gather", [0, 1])
def test_gemv_over_the_blocked_layout(gather):
    # [blocks, in, block_n] storage (the last block padded) gives the plain layout's result, both tiers
    x, w, wm = _case(150, 45, torch.float32, seed=11)
    ref = tiered_linear_reference(x[None], w, wm, None, 1.0, 0.4)[0]
    wt, wmt = block_layout(w.t(), 16), block_layout(wm.t(), 16)
    assert wt.shape == (3, 150, 16)
    cfg = {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "GATHER": gather}   # BLOCK_N: the layout's
    out = torch.full((45,), float("nan"), device=DEVICE)
    y = tiered_gemv(x, wt, wmt, 1.0, 0.4, config=cfg, out=out, n_out=45)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_gemv_gather_lists_a_long_input_in_several_blocks():
    # the on-device compaction walks x in blocks of 1024: a longer input, all kept, some kept, none kept
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2500, generator=g).to(DEVICE), torch.randn(40, 2500, generator=g).to(DEVICE)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "GATHER": 1}
    for t in (0.0, 0.7, 1e9):
        ref = w @ torch.where(x.abs() >= t, x, 0.0)
        torch.testing.assert_close(tiered_gemv(x, w.t(), None, t, t, config=cfg), ref, rtol=1e-5, atol=1e-4)


def test_gemv_layouts_tiers_and_medium_dtype():
    x, w, wm = _case(96, 70, torch.float32, seed=1, medium_dtype=torch.float16)
    ref = tiered_linear_reference(x[None], w, wm, None, 0.9, 0.3)[0]
    # row-contiguous W.T (the decode layout) and a plain [out, in] weight viewed transposed give the same result
    wt_rows = w.t().contiguous()
    for wt in (w.t(), wt_rows):
        torch.testing.assert_close(tiered_gemv(x, wt, wm.t(), 0.9, 0.3), ref, rtol=1e-5, atol=1e-4)
    # thresholds of zero are the dense product; no medium tier (t_high == t_low) ignores the medium weights
    torch.testing.assert_close(tiered_gemv(x, w.t(), None, 0.0, 0.0), w @ x, rtol=1e-5, atol=1e-4)
    teal = tiered_gemv(x, w.t(), None, 0.6, 0.6)
    torch.testing.assert_close(teal, w @ torch.where(x.abs() >= 0.6, x, 0.0), rtol=1e-5, atol=1e-4)
    # everything dropped -> zeros
    assert torch.equal(tiered_gemv(x, w.t(), wm.t(), 1e9, 1e9), torch.zeros(70, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(5, 67, 45), (17, 130, 33), (2, 16, 16)])
def test_gemm_over_the_union_matches_reference(m, k, n, dtype):
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) > 0.4)).to(DEVICE, dtype)  # some dead channels
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    wm = (w.float() * (torch.rand(n, k, generator=g).to(DEVICE) > 0.5)).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    y = tiered_gemm(x, w.t(), wm.t(), 1.0, 0.3, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16,
                                                         "num_warps": 4}, out=out)
    ref = tiered_linear_reference(x.float(), w.float(), wm.float(), None, 1.0, 0.3)
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    idx = kept_channels(x, 0.3)
    assert idx.numel() < k and torch.equal(idx.cpu(), torch.nonzero((x.abs() >= 0.3).any(0).cpu()).flatten().int())


def test_op_routes_decode_union_and_dense_and_compiles():
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(40, 72, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    wm = w * 0.5
    for x in (torch.randn(1, 1, 72, generator=g),                                  # decode: GEMV
              torch.randn(2, 3, 72, generator=g) * (torch.rand(72, generator=g) > 0.5),  # sparse union: GEMM
              torch.randn(3, 9, 72, generator=g)):                                  # dense union: fallback
        x = x.to(DEVICE)
        ref = tiered_linear_reference(x, w, wm, b, 0.8, 0.2)
        torch.testing.assert_close(triton_tiered_linear(x, w, wm, b, 0.8, 0.2), ref, rtol=1e-5, atol=1e-4)
    assert kept_channels(x.reshape(-1, 72), 0.2).numel() > DENSE_ABOVE * 72
    # an opaque custom op with a fake impl: Inductor compiles around it
    f = torch.compile(lambda x: torch.relu(torch.ops.sparsefx.triton_tiered_linear(x, w, wm, b, 0.8, 0.2)),
                      backend="inductor", fullgraph=True)
    x = torch.randn(1, 1, 72, device=DEVICE)
    torch.testing.assert_close(f(x), torch.relu(tiered_linear_reference(x, w, wm, b, 0.8, 0.2)), rtol=1e-5,
                               atol=1e-4)


def test_bad_shapes_are_named():
    x, w, wm = _case(16, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"x must be \[in\]"):
        tiered_gemv(x[None], w.t(), None, 0.5, 0.5)
    with pytest.raises(ValueError, match="wmt"):
        tiered_gemv(x, w.t(), wm[:, :4].t(), 0.5, 0.2)
    with pytest.raises(ValueError, match="out must be"):
        tiered_gemv(x, w.t(), None, 0.5, 0.5, out=torch.empty(3, device=DEVICE))
    assert default_gemv_config(11008, 4096)["SPLIT_K"] >= 1
