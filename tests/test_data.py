"""The evaluation/calibration protocol on the real texts (fetched from the exllamav2 wheel once, then cached)."""

import dataclasses

import pytest

from sparsefx.data import PROTOCOL, calibration_batches, eval_windows, load_text
from sparsefx.errors import CalibrationError, DataError


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def test_eval_windows_follow_the_protocol(tok):
    w = eval_windows(tok)
    assert tuple(w.shape) == (16, 1024)
    text = tok.decode(w[0])
    assert "<doc" not in text and "</doc>" not in text
    # no special tokens were added: the first token is the first word of the text, not BOS
    assert int(w[0, 0]) not in tok.all_special_ids
    # deterministic and equal to tokenising the stripped text directly
    import re

    direct = tok(re.sub(r"</?doc\b[^>]*>", "", load_text("wiki"))[:200_000], add_special_tokens=False)["input_ids"]
    assert w.flatten().tolist() == direct[:16384]


def test_calibration_batches(tok):
    c = calibration_batches(tok)
    assert tuple(c.shape) == (32, 512)
    assert len(set(map(tuple, c.tolist()))) == 32


def test_too_little_calibration_text(tok):
    with pytest.raises(CalibrationError, match="too little calibration text"):
        calibration_batches(tok, text="only a few words here")
    big = dataclasses.replace(PROTOCOL, calib_samples=10_000)
    with pytest.raises(CalibrationError, match="10000 x 512"):
        calibration_batches(tok, big)


def test_unknown_text():
    with pytest.raises(DataError, match="unknown text"):
        load_text("imagenet")
