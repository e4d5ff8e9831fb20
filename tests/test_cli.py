"""The command line on the real model: compress -> artifact -> eval, and clear errors."""

import json

import pytest
import torch

from sparsefx.cli import main
from sparsefx.codegen import backend

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


def _compress_then_eval(tmp_path, recipe_yaml: str, flag: str, tokens: int = 1024, model: str = "smollm2") -> dict:
    """Compress ``model`` (SmolLM2 by default) with ``recipe_yaml``, then ``sparsefx eval`` the artifact on
    ``tokens`` tokens (one window) without and with ``flag``: ``{(): json, (flag,): json}``."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml)
    out = tmp_path / "artifact"
    assert main(["compress", model, "-r", str(recipe), "-o", str(out), "--no-progress"]) == 0
    res = {}
    for flags in ((), (flag,)):
        path = tmp_path / f"eval{len(flags)}.json"
        assert main(["eval", str(out), "--tokens", str(tokens), "--window", str(tokens), "--no-speed",
                     "--no-progress", "--json", str(path), *flags]) == 0
        res[flags] = json.loads(path.read_text())
    return res


def test_eval_compiled_through_the_backend_matches_eager(tmp_path, tiny_checkpoint, monkeypatch):
    """The CLI's --compile path end to end, on a 4-layer Llama checkpoint (Inductor compiling SmolLM2's 30 layers
    took 3 of this test's 3.2 minutes on 2 cores; SmolLM2 compiled: python bench/decode_e2e.py --compile)."""
    folder = tiny_checkpoint(dtype=torch.float32, layers=4)
    backend.counters.clear()
    compiled_with = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        compiled_with.append(dict(kwargs.get("options") or {}))   # a copy: torch.compile pops guard_filter_fn
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    from sparsefx.codegen import cpu

    real_prepare = cpu.prepare_cpu_decode

    def recording_prepare(model, **kwargs):
        n = real_prepare(model, **kwargs)
        compiled_with.append(("prepared", n))
        return n

    monkeypatch.setattr(cpu, "prepare_cpu_decode", recording_prepare)
    with torch._inductor.config.patch(fx_graph_cache=False):   # a cache hit would skip the lowering pass
        res = _compress_then_eval(tmp_path, "calibration: {samples: 4, seqlen: 64}\npasses: [{method: daws, "
                                            "sparsity: 0.5}]\n", "--compile", tokens=512, model=str(folder))
    assert res[("--compile",)]["compiled"] and not res[()]["compiled"]
    # one compiled model per process: the CLI leaves out Dynamo's nn.Module guards
    # the compiled model is prepared for the decode kernels first (all 4 x 7 DAWS linears re-stored): their fast
    # one-token paths read that layout, the backend does not re-store weights
    assert compiled_with[0] == ("prepared", 4 * 7)
    assert [options.get("guard_filter_fn") for options in compiled_with[1:]] == \
        [torch.compiler.skip_guard_on_all_nn_modules_unsafe]
    assert backend.counters["cpu.tiered_linear"] == 4 * 7 and backend.counters["fallback"] == 0
    # Not bit-equal: Inductor reassociates fp32 sums (RMSNorm), a few |x| cross a threshold and the change cascades
    # (on SmolLM2 with 2 x 64 calibration tokens, 1e-7 relative noise on the input embeddings moved the eager
    # perplexity by 0.8 %; compiled differed by 0.7 %).
    assert res[("--compile",)]["ppl"] == pytest.approx(res[()]["ppl"], rel=0.02)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "never downloads from a hub" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [{method: wanda, pattern: '4:2'}]")
    assert main(["compress", "smollm2", "-r", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "wanda.pattern" in capsys.readouterr().err


def test_gisp_compress_eval_at_levels_and_export(tmp_path, smollm2):
    recipe = tmp_path / "gisp.yaml"
    recipe.write_text("calibration: {samples: 2, seqlen: 64}\n"
                      "passes: [{method: gisp, sparsity: 0.2, steps: 2, level: 0.0}]\n")
    out = tmp_path / "gisp"
    assert main(["compress", "smollm2", "-r", str(recipe), "-o", str(out), "--no-progress"]) == 0
    res = {}
    for level in ("0.0", "0.2"):
        path = tmp_path / f"eval{level}.json"
        assert main(["eval", str(out), "--level", level, "--tokens", "1024", "--no-speed", "--no-progress",
                     "--json", str(path)]) == 0
        res[level] = json.loads(path.read_text())
    # a fifth of the attention/MLP parameters are gone (embeddings and norms stay)
    assert res["0.2"]["linear_params"] == pytest.approx(0.8 * res["0.0"]["linear_params"], rel=0.01)
    assert res["0.0"]["ppl"] < res["0.2"]["ppl"] < 10 * res["0.0"]["ppl"]
    small = tmp_path / "gisp20"
    assert main(["export", str(out), "--level", "0.2", "-o", str(small)]) == 0
    assert (small / "model.safetensors").stat().st_size < 0.9 * (out / "model.safetensors").stat().st_size


def test_margin_pairs_file(tmp_path, capsys, smollm2):
    from sparsefx.data import load_pairs

    good = tmp_path / "pairs.jsonl"
    good.write_text('{"prompt": "The capital of France is", "correct": " Paris", "incorrect": " Rome"}\n\n'
                    '{"prompt": "2 + 2 =", "correct": " 4", "incorrect": " 5"}\n')
    pairs = load_pairs(good, smollm2[1])
    assert len(pairs) == 2 and all(t.dtype == torch.long and t.numel() > 0 for p in pairs for t in p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "correct": "y"}\n')
    recipe = tmp_path / "margin.yaml"
    recipe.write_text("passes: [{method: gisp, sparsity: 0.1, steps: 1, objective: margin}]\n")
    assert main(["compress", "smollm2", "-r", str(recipe), "-o", str(tmp_path / "m"), "--pairs", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["eval", "smollm2", "--level", "0.1"]) == 2
    assert "--level applies to structurally pruned artifacts" in capsys.readouterr().err


def test_eval_decode_path_matches_prefill_on_a_quantized_artifact(tmp_path, smollm2):
    # one 256-token window: the decode path runs one forward per token (1,024 tokens took minutes on 2 cores)
    res = _compress_then_eval(tmp_path, "passes: [{method: rtn, bits: 4, group_size: 64}]\n", "--decode-path", 256)
    assert res[("--decode-path",)]["decode_path"] and not res[()]["decode_path"]
    assert res[("--decode-path",)]["tokens"] == res[()]["tokens"] == 255
    # the C++ decode kernel (packed codes) against dequantize + GEMM: fp32 summation order only
    assert res[("--decode-path",)]["ppl"] == pytest.approx(res[()]["ppl"], rel=1e-4)
    # int8 activations: the decode path now rounds each linear's input; close to, and not equal to, prefill's
    q8 = tmp_path / "eval_q8.json"
    assert main(["eval", str(tmp_path / "artifact"), "--tokens", "256", "--window", "256", "--no-speed",
                 "--no-progress", "--json", str(q8), "--decode-path", "--int8-activations"]) == 0
    got = json.loads(q8.read_text())
    assert got["int8_activations"] and got["decode_path"] and not res[()]["int8_activations"]
    assert got["ppl"] != res[("--decode-path",)]["ppl"]
    assert got["ppl"] == pytest.approx(res[()]["ppl"], rel=2e-2)
