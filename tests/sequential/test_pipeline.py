"""The sequential pipeline: every method block by block, equal to the whole-model run on dense inputs; streaming
a bf16 sharded checkpoint one block at a time into a bf16 artifact; refusals and interruptions."""

import json

import pytest
import torch

from sparsefx.artifact import checkpoint_dtypes, load_artifact, save_artifact
from sparsefx.errors import RecipeError
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress
from sparsefx.sequential import CheckpointSource, ModelSource, compress_blocks
from sparsefx.sequential.pipeline import compress_checkpoint
from sparsefx.shards import ShardError, TensorStore

METHODS = {
    "magnitude-2of4-packed": "{method: magnitude, pattern: '2:4', pack: true}",
    "wanda": "{method: wanda, sparsity: 0.5}",
    "daws-banded-3tiers": "{method: daws, sparsity: 0.5, layout: banded, medium_tiers: [0.25, 0.5, 0.75]}",
    "daws-separate": "{method: daws, sparsity: 0.5, medium_fraction: 0.3, medium_weight_sparsity: 0.5}",
    "daws-greedy": "{method: daws, sparsity: 0.5, allocation: greedy, greedy_tokens: 48}",
    "rsparse": "{method: rsparse, sparsity: 0.5}",
    "cats": "{method: cats, sparsity: 0.5}",
    "rtn": "{method: rtn, bits: 3, group_size: 32}",
    "gptq": "{method: gptq, bits: 4, group_size: 32}",
    "svd": "{method: svd, budget: 4.375, bits: 3, group_size: 32}",
    "q_then_l": "{method: q_then_l, budget: 4.0, bits: 2, group_size: 32}",
    "l_then_q": "{method: l_then_q, budget: 4.0, bits: 2, group_size: 32}",
    "dam": "{method: dam, budget: 4.375, bits: 3, group_size: 32, factor_group: 32}",
    "wanda+head8": "{method: wanda, sparsity: 0.5}, {method: rtn, bits: 8, group_size: 32, roles: [lm_head]}",
}


def _recipe(passes: str) -> Recipe:
    return Recipe.from_yaml(f"passes: [{passes}]\ncalibration: {{batch_size: 2}}")


def _calib(n: int = 6, s: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(1))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_sequential_on_dense_inputs_equals_the_whole_model_run(method, tokens):
    """Same pass objects on one block's graph at a time, calibrated on the dense hidden states: the compressed
    model is the whole-model one, bit for bit."""
    recipe, calib = _recipe(METHODS[method]), _calib()
    whole, seq = tiny_model("llama"), tiny_model("llama")
    compress(whole, recipe, calibration=calib, progress=False)
    result = compress(seq, recipe, calibration=calib, progress=False, sequential=True, calib_inputs="dense")
    assert result.graph_module is None and result.sequential["blocks"] == 2
    torch.testing.assert_close(_logits(seq, tokens), _logits(whole, tokens), rtol=0, atol=0)
    reports = {r.name: r for r in result.reports}
    assert reports["annotate"].matches == 14     # 7 linears x 2 blocks, each block's graph annotated on its own
    changed = [r for r in result.reports if r.name not in ("annotate", "calibrate")]
    assert changed and all(r.matches > 0 for r in changed)


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["wanda", "gptq", "daws-greedy"])
def test_sequential_equals_whole_on_other_architectures(arch, method, tokens):
    """Gemma3 (sliding-window masks per layer type, scaled embeddings, tied head), Mistral, Qwen2."""
    recipe, calib = _recipe(METHODS[method]), _calib(n=4, s=40)   # 40 > the tiny models' sliding window of 32
    whole, seq = tiny_model(arch), tiny_model(arch)
    compress(whole, recipe, calibration=calib, progress=False)
    compress(seq, recipe, calibration=calib, progress=False, sequential=True, calib_inputs="dense")
    torch.testing.assert_close(_logits(seq, tokens), _logits(whole, tokens), rtol=0, atol=0)


def test_compressed_inputs_calibrate_later_blocks_on_compressed_outputs(tokens):
    """The default: block 1 is calibrated on what the compressed block 0 outputs, so its Wanda statistics (and
    with them its masks' scores) differ from the dense ones; block 0 sees the same inputs either way."""
    recipe, calib = _recipe(METHODS["wanda"]), _calib()
    dense, comp = tiny_model("llama"), tiny_model("llama")
    rd = compress(dense, recipe, calibration=calib, progress=False, sequential=True, calib_inputs="dense")
    rc = compress(comp, recipe, calibration=calib, progress=False, sequential=True)
    assert rc.sequential["inputs"] == "compressed"
    for key, s in rd.stats.items():
        same = torch.equal(s.sq_sum, rc.stats[key].sq_sum)
        assert same == key.startswith("model.layers.0:"), key
    assert not torch.equal(_logits(dense, tokens), _logits(comp, tokens))


def test_restructuring_passes_are_refused_with_the_reason():
    with pytest.raises(RecipeError, match="gisp removes heads and channels ranked over the whole model"):
        compress(tiny_model("llama"), _recipe("{method: gisp, sparsity: 0.2}"), calibration=_calib(),
                 progress=False, sequential=True)


def test_model_source_visits_each_block_once_in_order(monkeypatch):
    model = tiny_model("llama", layers=3)
    src = ModelSource(model, device="cpu")
    turns = []
    real_block = src.block

    def block(i):
        turns.append(i)
        return real_block(i)

    monkeypatch.setattr(src, "block", block)
    compress_blocks(src, _recipe(METHODS["wanda"]), _calib(), progress=False)
    assert turns == [0, 1, 2]


def test_checkpoint_is_streamed_one_block_at_a_time_into_a_bf16_artifact(tiny_checkpoint, tmp_path, monkeypatch,
                                                                          tokens):
    ckpt = tiny_checkpoint("llama", layers=3)
    recipe, calib = _recipe(METHODS["wanda+head8"]), _calib()
    loaded_blocks = []
    real_block = CheckpointSource.block

    def block(self, i):
        # at any time at most the block whose turn it is holds real tensors; the others are on the meta device
        real = [j for j, b in enumerate(self.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        loaded_blocks.append(real)
        return real_block(self, i)

    monkeypatch.setattr(CheckpointSource, "block", block)
    out = tmp_path / "seq"
    compress_checkpoint(ckpt, recipe, out, calib, None, inputs="dense", max_shard_size=40_000, progress=False)
    assert loaded_blocks == [[], [], []]
    # every checkpoint tensor is in the artifact (dense, or as a compressed module's state), dense ones in bf16
    store, plan = TensorStore(out, "model"), json.loads((out / "compressed.json").read_text())
    assert len(store.files) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in TensorStore(ckpt).keys():
        assert name in store or name.rpartition(".")[0] in plan, name
    assert {store.dtype(k) for k in store.keys()} == {torch.bfloat16}
    assert list(plan) == ["lm_head"] and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # equal to compressing the same checkpoint whole-model (loaded in fp32) and saving it in its dtypes
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    compress(whole, recipe, calibration=calib, progress=False)
    save_artifact(tmp_path / "whole", whole, None, recipe, {}, dtypes=checkpoint_dtypes(ckpt))
    a, b = load_artifact(out).model, load_artifact(tmp_path / "whole").model
    torch.testing.assert_close(_logits(a, tokens), _logits(b, tokens), rtol=0, atol=0)
    report = json.loads((out / "report.json").read_text())
    assert report["sequential"]["blocks"] == 3 and len(report["sequential"]["block_seconds"]) == 3


def test_tied_checkpoint_keeps_one_embedding(tiny_checkpoint, tmp_path, tokens):
    """Gemma3 ties its LM head to the embeddings: the artifact stores the matrix once and loads tied."""
    ckpt = tiny_checkpoint("gemma3")
    out = tmp_path / "g"
    compress_checkpoint(ckpt, _recipe(METHODS["wanda"]), out, _calib(), None, progress=False)
    store = TensorStore(out)
    assert "model.embed_tokens.weight" in store and "lm_head.weight" not in store
    model = load_artifact(out).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(_logits(model, tokens)).all()


def test_interrupted_run_leaves_no_partial_artifact(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint("llama", layers=3)
    from sparsefx.sequential import pipeline

    calls = []
    real_lower = pipeline.lower_to_eager

    def lower(gm, model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # Ctrl-C while the second block is lowered, after the first was written
        return real_lower(gm, model)

    monkeypatch.setattr(pipeline, "lower_to_eager", lower)
    out = tmp_path / "out" / "w50"
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(ckpt, _recipe(METHODS["wanda"]), out, _calib(), None, max_shard_size=10_000,
                            progress=False)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_a_checkpoint_missing_a_block_tensor_is_refused_before_compressing(tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    ckpt = tiny_checkpoint("llama", shard="10MB")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShardError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        CheckpointSource(ckpt)


@pytest.mark.parametrize("method", ["wanda", "gptq", "daws-greedy"])
def test_finished_blocks_are_freed_before_the_next_is_loaded(method, tiny_checkpoint, tmp_path, monkeypatch):
    """Memory independent of depth: when block i is loaded, no tensor of blocks < i is alive anywhere (the block,
    its graph and export's objects form reference cycles that the pipeline collects)."""
    import weakref

    ckpt = tiny_checkpoint("llama", layers=4)
    finished, alive_at_load = [], []
    real_block, real_end = CheckpointSource.block, CheckpointSource.end_block

    def block(self, i):
        alive_at_load.append(sum(r() is not None for r in finished))
        return real_block(self, i)

    def end_block(self, i, writer):
        finished.extend(weakref.ref(t) for t in [*self.blocks[i].parameters(), *self.blocks[i].buffers()])
        return real_end(self, i, writer)

    monkeypatch.setattr(CheckpointSource, "block", block)
    monkeypatch.setattr(CheckpointSource, "end_block", end_block)
    compress_checkpoint(ckpt, _recipe(METHODS[method]), tmp_path / "out", _calib(8, 32), None, progress=False)
    assert alive_at_load == [0, 0, 0, 0] and len(finished) >= 4 * 9
