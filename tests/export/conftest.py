"""Artifacts for the export tests: tiny ones made per test, and SmolLM2 through ``rtn-w4-g32-sym`` made once."""

from __future__ import annotations

import pytest
import torch

from sparsefx.artifact import save_artifact
from sparsefx.models import tiny_model, tiny_tokenizer
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

HEAD8 = [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
         {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True, "roles": ["lm_head"]}]


@pytest.fixture
def head8():
    """RTN 4-bit g32 symmetric layers and an 8-bit symmetric g32 LM head (llama.cpp's Q4_0 file layout)."""
    return [dict(p) for p in HEAD8]


@pytest.fixture
def make_artifact(tmp_path):
    """``make(passes, arch="llama", name="art", dtype=fp32, tied=False) -> folder``: a tiny model compressed by
    ``passes`` (default: RTN 4-bit g32 symmetric) and saved with its tokenizer; ``tied``: embeddings tied to the
    head first, as SmolLM2's are."""

    def make(passes=None, arch="llama", name="art", dtype=torch.float32, tied=False):
        recipe = Recipe.from_dict({"name": "t", "calibration": {"samples": 4, "seqlen": 16},
                                   "passes": passes or [{"method": "rtn", "bits": 4, "group_size": 32,
                                                         "symmetric": True}]})
        model = tiny_model(arch).to(dtype)
        if tied:
            model.config.tie_word_embeddings = True
            model.tie_weights()
        result = compress(model, recipe, calibration=torch.randint(0, 256, (4, 16)), progress=False)
        return save_artifact(tmp_path / name, model, tiny_tokenizer(), recipe, result.report_dict())

    return make


@pytest.fixture(scope="module")
def smollm2_q4_0(tmp_path_factory, smollm2):
    """SmolLM2 compressed by ``rtn-w4-g32-sym`` (llama.cpp's Q4_0 grid), saved once per test module."""
    from sparsefx.models import load_model
    from sparsefx.passes.config import resolve_recipe

    _, tok = smollm2
    model, _ = load_model("smollm2")
    recipe = resolve_recipe("rtn-w4-g32-sym")
    result = compress(model, recipe, calibration=torch.zeros(1, 8, dtype=torch.long), progress=False)
    return save_artifact(tmp_path_factory.mktemp("smollm2") / "art", model, tok, recipe, result.report_dict())
