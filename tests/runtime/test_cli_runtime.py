"""``sparsefx eval --runtime``: the protocol's perplexity through the C++ decode runtime, equal to the HF path's."""

from __future__ import annotations

import json

import pytest
import torch

from sparsefx.cli import main


def test_eval_runtime_perplexity_equals_the_hf_path(tmp_path, tiny_checkpoint, capsys):
    folder = tiny_checkpoint(arch="qwen2", dtype=torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: q\ncalibration: {samples: 2, seqlen: 32}\n"
                      "passes: [{method: rtn, bits: 4, group_size: 32, symmetric: true}]\n")
    art = tmp_path / "art"
    assert main(["compress", str(folder), "-r", str(recipe), "-o", str(art), "--no-progress"]) == 0
    res = {}
    for flags in ((), ("--runtime",)):
        path = tmp_path / f"e{len(flags)}.json"
        assert main(["eval", str(art), "--tokens", "256", "--window", "128", "--no-speed", "--no-progress",
                     "--json", str(path), *flags]) == 0
        res[flags] = json.loads(path.read_text())
    assert res[("--runtime",)]["runtime"] is True
    assert res[("--runtime",)]["ppl"] == pytest.approx(res[()]["ppl"], rel=1e-5)
    assert "C++ decode runtime" in capsys.readouterr().out
    # int8 activations change the numbers a little, not a lot
    path = tmp_path / "q8.json"
    assert main(["eval", str(art), "--tokens", "256", "--window", "128", "--no-progress", "--runtime",
                 "--int8-activations", "--json", str(path)]) == 0
    q8 = json.loads(path.read_text())
    assert q8["ppl"] != res[()]["ppl"] and q8["ppl"] == pytest.approx(res[()]["ppl"], rel=0.05)
    assert q8["decode_tok_s"] > 0


def test_eval_runtime_refusals(tmp_path, tiny_checkpoint, capsys):
    folder = tiny_checkpoint(arch="llama", dtype=torch.float32)
    assert main(["eval", str(folder), "--runtime", "--tasks", "arc_easy"]) == 2
    assert "--runtime" in capsys.readouterr().err
    gemma = tiny_checkpoint(arch="gemma3", dtype=torch.float32, name="g")
    assert main(["eval", str(gemma), "--runtime", "--no-speed", "--no-progress", "--tokens", "256",
                 "--window", "128"]) == 2
    assert "gemma3_text" in capsys.readouterr().err
