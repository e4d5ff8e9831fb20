"""End to end on the real SmolLM2-135M (CPU). Short slices of the protocol keep this to about a minute."""

import dataclasses

import pytest
import torch

from sparsefx.data import PROTOCOL, calibration_batches, eval_windows
from sparsefx.eval import perplexity
from sparsefx.ir import annotate, annotated_linears, capture, coupled_groups
from sparsefx.models import load_model
from sparsefx.passes.config import resolve_recipe
from sparsefx.pipeline import compress

pytestmark = pytest.mark.real_model
SHORT = dataclasses.replace(PROTOCOL, eval_tokens=2048, calib_samples=8)


def test_smollm2_capture_and_annotation(smollm2):
    model, _ = smollm2
    gm = capture(model)
    annotate(gm)
    roles = [i.role for _, i in annotated_linears(gm)]
    assert roles.count("q") == roles.count("down") == 30 and roles.count("lm_head") == 1
    attn = [g for g in coupled_groups(gm) if g.kind == "attention"]
    assert all(g.n_units == 3 for g in attn)  # 9 query heads in 3 KV groups


def test_smollm2_zero_sparsity_is_exact_and_generates(smollm2):
    dense_model, tok = smollm2
    windows = eval_windows(tok, SHORT)
    dense_ppl, _, _ = perplexity(dense_model, windows, progress=False)
    assert 8 < dense_ppl < 30  # the protocol's dense figure is 19.8 over 16k tokens; 2k tokens land near it
    ids = windows[:1, :128]
    model, _ = load_model("smollm2")
    compress(model, resolve_recipe("dense"), calibration=calibration_batches(tok, SHORT), progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_model(ids).logits)
    assert perplexity(model, windows, progress=False)[0] == pytest.approx(dense_ppl, rel=1e-6)
    out = model.generate(ids[:, :8], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)


def test_smollm2_wanda_beats_magnitude(smollm2):
    # split from the test above: each under a minute on 2 cores, where together they took two
    _, tok = smollm2
    windows = eval_windows(tok, SHORT)
    calib = calibration_batches(tok, SHORT)
    ppl = {}
    for name in ("magnitude-50", "wanda-50"):
        model, _ = load_model("smollm2")
        compress(model, resolve_recipe(name), calibration=calib, progress=False)
        ppl[name] = perplexity(model, windows, progress=False)[0]
    assert ppl["wanda-50"] < ppl["magnitude-50"]
