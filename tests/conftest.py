"""Shared fixtures. Tiny random models are rebuilt per test (passes mutate weights in place)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when a kernel module is first imported,
# which sparsefx does lazily, so setting it here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsefx.ir import annotate, capture
from sparsefx.models import TINY_ARCHS, tiny_model, tiny_tokenizer


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def annotated_llama(llama):
    gm = capture(llama)
    annotate(gm)
    return llama, gm


@pytest.fixture
def tokens():
    """Fresh random token ids [3, 13] (odd batch and length) for comparing outputs."""
    return torch.randint(0, 256, (3, 13))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (fp32) and its tokenizer; converted from the GGUF on first use."""
    from sparsefx.models import load_model

    return load_model("smollm2")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """``make(arch="llama", dtype=bf16, shard="60KB", layers=2) -> folder``: a tiny model saved as an HF
    checkpoint (sharded safetensors with an index, its own byte-level tokenizer), as a user's would be."""

    def make(arch: str = "llama", dtype=torch.bfloat16, shard: str = "60KB", layers: int = 2, name: str = "ckpt"):
        folder = tmp_path / name
        model = tiny_model(arch, layers=layers).to(dtype)
        model.save_pretrained(folder, max_shard_size=shard)
        tiny_tokenizer().save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def calib_text(tmp_path):
    """A text file of a few thousand byte tokens, for ``--calib-file``."""
    import random

    rng = random.Random(0)
    words = ["the", "model", "weights", "of", "a", "layer", "are", "pruned", "and", "quantized", "block", "by"]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return path
