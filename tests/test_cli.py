"""The command line on the real model: compress -> artifact -> eval, and clear errors."""

import json

import pytest

from sparsefx.cli import main

pytestmark = pytest.mark.real_model


def test_compress_then_eval_artifact(tmp_path, capsys, smollm2):
    out = tmp_path / "mag50"
    assert main(["compress", "smollm2", "-r", "magnitude-50", "-o", str(out), "--no-progress"]) == 0
    assert (out / "sparsefx.json").is_file() and (out / "model.safetensors").is_file()
    res = tmp_path / "eval.json"
    assert main(["eval", str(out), "--tokens", "1024", "--no-speed", "--no-progress", "--json", str(res)]) == 0
    data = json.loads(res.read_text())
    assert data["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert data["tokens"] == 1023 and data["ppl"] > 1
    # a second compress to the same folder is refused with a clear message
    assert main(["compress", "smollm2", "-r", "magnitude-50", "-o", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "never downloads from a hub" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [{method: wanda, pattern: '4:2'}]")
    assert main(["compress", "smollm2", "-r", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "wanda.pattern" in capsys.readouterr().err
