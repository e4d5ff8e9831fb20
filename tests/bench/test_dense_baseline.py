"""The dense baseline of the CPU kernel benchmarks (bench/harness.py: dense_gemv_calls / best_dense)."""

import pytest
import torch

from harness import best_dense, cold_weights, dense_gemv_calls


@pytest.mark.parametrize("x_shape", [(37,), (1, 37), (3, 37)])
def test_every_dense_call_computes_the_linear_on_the_next_copy(x_shape):
    gen = torch.Generator().manual_seed(0)
    ws, wts, nxt = cold_weights(29, 37, 3, gen)
    assert all(torch.equal(w, wt.t()) for w, wt in zip(ws, wts))
    x = torch.randn(*x_shape, generator=gen)
    used = []
    # the transposed copies scaled by 2: linear_t must read those, mv and linear the [out, in] ones
    fns = dense_gemv_calls(x, ws, [2 * wt for wt in wts], lambda: used.append(nxt()) or used[-1])
    assert set(fns) == ({"mv", "linear", "linear_t"} if x.numel() == 37 else {"linear", "linear_t"})
    for name, fn in fns.items():
        for _ in range(4):
            got = fn()
            ref = x.reshape(-1, 37) @ ws[used[-1]].t() * (2 if name == "linear_t" else 1)
            torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5, msg=name)
    assert len(used) == 4 * len(fns) and all(a != b for a, b in zip(used, used[1:]))  # a fresh copy per call

def test_best_dense_is_the_fastest_call_timed():
    assert best_dense({"mv": 3.0, "linear": 2.0, "linear_t": 2.5, "kernel": 0.1}) == (2.0, "linear")
    assert best_dense({"linear": 2.0, "linear_t": 1.5}) == (1.5, "linear_t")
