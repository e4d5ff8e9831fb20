"""llama.cpp runs our GGUF exports (``llama-cpp-python``, an optional extra: skipped when it is not installed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsefx.artifact import load_artifact
from sparsefx.export import export_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional extra sparsefx[llamacpp])")

from sparsefx.export.llamacpp import LlamaCpp


def _greedy_hf(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False)])
def test_tiny_export_runs_in_llama_cpp(tmp_path, make_artifact, bits, symmetric):
    """Q4_0 / Q8_0 / Q4_1 of a tiny llama: llama.cpp's logits match the artifact's (llama.cpp computes in its own
    order, with activations quantized to 8 bits for the quantized dot products) and its greedy tokens equal ours."""
    art = make_artifact([{"method": "rtn", "bits": bits, "group_size": 32, "symmetric": symmetric}])
    export_gguf(art, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    ours = load_artifact(art).model
    engine = LlamaCpp(tmp_path / "m.gguf", threads=1, n_ctx=128)
    tokens = torch.randint(0, 256, (24,)).tolist()
    with torch.no_grad():
        ref = ours(torch.tensor([tokens])).logits[0]
    got = engine.logits(tokens)
    assert got.shape == ref.shape
    # measured: 1-2 % of the largest logit (llama.cpp rounds activations to 8 bits for its Q4/Q8 dot products)
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert engine.greedy(tokens[:8], 16) == _greedy_hf(ours, tokens[:8], 16)


@pytest.mark.real_model
def test_smollm2_q4_0_in_llama_cpp(tmp_path, smollm2, smollm2_q4_0):
    """SmolLM2 through rtn-w4-g32-sym: llama.cpp's greedy tokens on the eval text's start equal ours for 32 steps,
    and its perplexity over the first two protocol windows is within 1 % of the artifact's."""
    import dataclasses

    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.eval import perplexity

    _, tok = smollm2
    art = smollm2_q4_0
    export_gguf(art, tmp_path / "m.gguf")
    ours = load_artifact(art).model
    windows = eval_windows(tok, dataclasses.replace(PROTOCOL, eval_tokens=2048))
    engine = LlamaCpp(tmp_path / "m.gguf", threads=2, n_ctx=1024)
    prompt = windows[0, :32].tolist()
    assert engine.greedy(prompt, 32) == _greedy_hf(ours, prompt, 32)
    ppl_ours = perplexity(ours, windows, progress=False)[0]
    assert engine.perplexity(windows) == pytest.approx(ppl_ours, rel=0.01)


def test_sparsefx_eval_scores_a_gguf_file_with_llama_cpp(tmp_path, make_artifact, capsys):
    """`sparsefx eval m.gguf`: llama.cpp's perplexity on the protocol's windows (the GGUF's own tokenizer), next
    to the artifact's on the same windows."""
    import json

    from sparsefx.cli import main
    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.eval import perplexity

    art = make_artifact()
    export_gguf(art, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert main(["eval", str(tmp_path / "m.gguf"), "--tokens", "512", "--window", "128", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["engine"] == "llama.cpp" and got["tokens"] == 4 * 127
    loaded = load_artifact(art)
    windows = eval_windows(loaded.tokenizer, dataclasses.replace(PROTOCOL, eval_tokens=512, window=128))
    assert got["ppl"] == pytest.approx(perplexity(loaded.model, windows, progress=False)[0], rel=0.02)
