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
from sparsefx.models import TINY_ARCHS, tiny_model


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
