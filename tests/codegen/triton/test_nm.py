"""Triton N:M sparse matmul over the packed layout, against the reference; the layout itself."""

import pytest
import torch

pytest.importorskip("triton")

from sparsefx.ops.nm.triton import nm_matmul, nm_matmul_reference, pack_nm, triton_nm_linear, unpack_nm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _nm_weight(out_f, in_f, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    groups = w.reshape(out_f, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(n, -1).indices, True)
    w = (groups * keep).reshape(out_f, in_f)
    w[0, :m] = 0.0                                  # a group with fewer than n non-zeros
    return w


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_pack_round_trip_and_refusal(n, m):
    w = _nm_weight(13, 8 * m, n, m, seed=n * m)
    values, index = pack_nm(w, n, m)
    assert values.shape == (13, 8 * n) and index.dtype == torch.uint8 and int(index.max()) < m
    assert torch.equal(unpack_nm(values, index, n, m), w)
    with pytest.raises(ValueError, match=f"more than {n} non-zeros"):
        pack_nm(torch.randn(4, 2 * m), n, m)
    with pytest.raises(ValueError, match="multiple of m"):
        pack_nm(torch.zeros(4, m + 1), n, m)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(n, m, rows, dtype):
    w = _nm_weight(37, 24 * m, n, m, seed=rows)                # 37 outputs: not a block multiple
    values, index = (t.to(DEVICE) for t in pack_nm(w, n, m))
    values = values.to(dtype)
    g = torch.Generator().manual_seed(rows + 1)
    x, bias = torch.randn(rows, 24 * m, generator=g).to(DEVICE, dtype), torch.randn(37, generator=g).to(DEVICE)
    ref = nm_matmul_reference(x, values, index, n, m, bias)
    torch.testing.assert_close(ref, x.float() @ w.to(DEVICE, dtype).float().T + bias)
    for cfg in (None, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 16, "num_warps": 4},
                {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_J": 16, "SPLIT_K": 5, "num_warps": 4}):   # split: atomics, bias once
        out = torch.full((rows, 37), float("nan"), device=DEVICE)
        # fp32 sums on both sides; fp16 inputs are exact in fp32, so only summation order differs
        torch.testing.assert_close(nm_matmul(x, values, index, n, m, bias, config=cfg, out=out), ref,
                                   rtol=1e-5, atol=1e-4)


def test_op_and_shape_errors():
    w = _nm_weight(20, 32, 2, 4, seed=0)
    values, index = (t.to(DEVICE) for t in pack_nm(w, 2, 4))
    x = torch.randn(2, 5, 32, device=DEVICE)
    torch.testing.assert_close(triton_nm_linear(x, values, index, None, 2, 4), x @ w.to(DEVICE).T,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit an 2:4 weight"):
        nm_matmul(torch.randn(1, 16, device=DEVICE), values, index, 2, 4)
