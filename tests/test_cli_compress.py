"""``sparsefx compress`` on a user's local checkpoint: whole-model or sequential, dtypes kept, memory refusals and
bad checkpoints named before anything is loaded."""

import json

import pytest
import torch

from sparsefx.cli import main
from sparsefx.shards import TensorStore


def _compress(ckpt, out, calib_text, *flags, recipe="wanda-50"):
    return main(["compress", str(ckpt), "-r", recipe, "-o", str(out), "--calib-file", str(calib_text),
                 "--no-progress", *flags])


def test_sequential_compress_keeps_bf16_and_loads(tiny_checkpoint, calib_text, tmp_path, capsys):
    import sparsefx

    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "w50"
    assert _compress(ckpt, out, calib_text, "--sequential", "--max-shard-size", "40KB") == 0
    captured = capsys.readouterr()
    assert "pipeline         sequential: about" in captured.err and f"wrote {out} (sequential)" in captured.out
    store = TensorStore(out)
    assert len(store.files) > 1 and {store.dtype(k) for k in store.keys()} == {torch.bfloat16}
    report = json.loads((out / "report.json").read_text())
    wanda = next(p for p in report["passes"] if p["name"] == "wanda")
    assert wanda["details"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["sequential"]["inputs"] == "compressed"
    model = sparsefx.load(out)
    assert next(model.parameters()).dtype == torch.float32    # computed in fp32 on CPU, stored in bf16
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_whole_model_compress_also_keeps_the_checkpoint_dtype(tiny_checkpoint, calib_text, tmp_path, capsys):
    ckpt = tiny_checkpoint("qwen2", dtype=torch.float16)
    out = tmp_path / "w50"
    assert _compress(ckpt, out, calib_text) == 0
    assert f"wrote {out} (whole)" in capsys.readouterr().out
    store = TensorStore(out)
    assert {store.dtype(k) for k in store.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_the_pipeline_is_chosen_by_the_estimates(tiny_checkpoint, calib_text, tmp_path, monkeypatch, capsys):
    """Whole-model when its estimate fits the budget (--max-memory, or 80 % of available memory), else sequential."""
    from sparsefx.sequential import memory

    def fake(shape, recipe, samples, seqlen, mode, *rest):
        return memory.Estimate(mode, {"weights": (10 if mode == "whole" else 2) * 2**30})

    monkeypatch.setattr(memory, "estimate", fake)
    ckpt = tiny_checkpoint("llama")
    assert _compress(ckpt, tmp_path / "a", calib_text, "--max-memory", "5GB") == 0
    assert "(sequential)" in capsys.readouterr().out
    assert _compress(ckpt, tmp_path / "b", calib_text, "--max-memory", "20GB") == 0
    assert "(whole)" in capsys.readouterr().out


def test_a_run_over_max_memory_refuses_before_loading(tiny_checkpoint, calib_text, tmp_path, monkeypatch, capsys):
    from sparsefx import models
    from sparsefx.sequential import pipeline

    def must_not_load(*a, **k):
        raise AssertionError("loaded a model although the run was refused")

    monkeypatch.setattr(models, "load_model", must_not_load)
    monkeypatch.setattr(pipeline.CheckpointSource, "__init__", must_not_load)
    ckpt = tiny_checkpoint("llama")
    for flags in (("--max-memory", "100MB"), ("--max-memory", "100MB", "--sequential")):
        assert _compress(ckpt, tmp_path / "x", calib_text, *flags) == 2
        err = capsys.readouterr().err
        assert "estimated to need more than --max-memory 95.37 MiB" in err and "about" in err and "runtime" in err
        assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_before_loading(tiny_checkpoint, calib_text, tmp_path, monkeypatch, capsys):
    from sparsefx import models

    monkeypatch.setattr(models, "resolve_model_path", lambda *a: pytest.fail("looked at the model"))
    (tmp_path / "out").mkdir()
    assert _compress(tiny_checkpoint(), tmp_path / "out", calib_text) == 2
    assert "already exists; add --overwrite" in capsys.readouterr().err


def test_missing_shard_and_wrong_index_are_named(tiny_checkpoint, calib_text, tmp_path, capsys):
    ckpt = tiny_checkpoint("llama")
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    name = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][name] = shards[1]
    index.write_text(json.dumps(data))
    for flags in ((), ("--sequential",)):
        assert _compress(ckpt, tmp_path / "x", calib_text, *flags) == 2
        assert f"{name!r} (and 0 more) is mapped to {shards[1]}" in capsys.readouterr().err
    (ckpt / shards[1]).unlink()
    assert _compress(ckpt, tmp_path / "x", calib_text, "--sequential") == 2
    assert f"['{shards[1]}'] listed in model.safetensors.index.json are missing" in capsys.readouterr().err


def test_blocks_that_cannot_be_found_are_named(tmp_path, calib_text, capsys):
    """GPT-2 keeps its blocks in a ModuleList, but computes with Conv1D, not nn.Linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsefx.models import tiny_tokenizer

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    assert _compress(tmp_path / "gpt2", tmp_path / "x", calib_text, "--sequential") == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel (model_type 'gpt2'): the sequential pipeline cannot find its decoder blocks" in err


def test_gisp_is_refused_sequentially_with_the_whole_model_estimate(tiny_checkpoint, calib_text, tmp_path, capsys):
    assert _compress(tiny_checkpoint(), tmp_path / "x", calib_text, "--sequential", recipe="gisp-30") == 2
    err = capsys.readouterr().err
    assert "gisp ranks heads and channels over the whole model" in err and "whole-model: about" in err
    assert "gradients" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tiny_checkpoint, calib_text, tmp_path, capsys):
    assert _compress(tiny_checkpoint(), tmp_path / "x", calib_text, "--device", "cuda") == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
