import json

import pytest
import torch

from sparsefx.artifact import load, load_artifact, save_artifact
from sparsefx.errors import ArtifactError
from sparsefx.models import tiny_model
from sparsefx.passes.calibrate import STATS
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress

RECIPE = Recipe.from_yaml("passes: [{method: wanda, pattern: '2:4'}]\ncalibration: {samples: 4, seqlen: 16}")


@pytest.fixture
def artifact(tmp_path):
    model = tiny_model("qwen2")
    result = compress(model, RECIPE, calibration=torch.randint(0, 256, (4, 16)), progress=False)
    out = save_artifact(tmp_path / "art", model, None, RECIPE, result.report_dict(),
                        stats=result.graph_module.meta[STATS])
    return model, out


def test_round_trip_reproduces_logits_exactly(artifact, tokens):
    model, out = artifact
    art = load_artifact(out)
    with torch.no_grad():
        assert torch.equal(art.model(tokens).logits, model(tokens).logits)
    assert art.recipe == RECIPE
    assert art.report["passes"][-1]["name"] == "wanda"
    assert len(art.stats) == 9 and all(s.n_tokens == 64 for s in art.stats.values())
    assert load(out).generate(tokens[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_existing_output_is_not_overwritten_by_default(artifact):
    model, out = artifact
    with pytest.raises(FileExistsError, match="overwrite"):
        save_artifact(out, model, None, RECIPE, {})


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills after the first shard is written: neither that shard nor the folder remains."""
    from sparsefx import shards

    written = []
    real_flush = shards.ShardWriter.flush

    def flush_then_fail(self):
        if written:
            raise RuntimeError("disk full")
        real_flush(self)
        written.append(self.parts[-1][0])

    monkeypatch.setattr(shards.ShardWriter, "flush", flush_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact(tmp_path / "x", tiny_model("llama"), None, RECIPE, {}, max_shard_size=20_000)
    assert written and list(tmp_path.iterdir()) == []


def test_corrupt_file_is_detected(artifact):
    _, out = artifact
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors is corrupt"):
        load_artifact(out)


def test_missing_files_are_named(artifact):
    _, out = artifact
    (out / "recipe.yaml").unlink()
    with pytest.raises(ArtifactError, match="recipe.yaml listed in the manifest is missing"):
        load_artifact(out)
    (out / "sparsefx.json").unlink()
    with pytest.raises(ArtifactError, match="not a sparsefx artifact"):
        load_artifact(out)
    with pytest.raises(ArtifactError, match="not a folder"):
        load_artifact(out / "nope")


def test_wrong_format_version(artifact):
    _, out = artifact
    m = json.loads((out / "sparsefx.json").read_text())
    m["version"] = 99
    (out / "sparsefx.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="v99"):
        load_artifact(out)


@pytest.mark.parametrize("entry, module, kind", [
    ("{method: daws, sparsity: 0.5}", "mlp.up_proj", "TieredLinear"),
    ("{method: daws, sparsity: 0.5, allocation: greedy}", "self_attn.k_proj", "TieredLinear"),
    ("{method: daws, sparsity: 0.5, medium_dtype: float16}", "mlp.down_proj", "TieredLinear"),
    ("{method: daws, sparsity: 0.5, medium_tiers: [0.3]}", "mlp.gate_proj", "TieredLinear"),
    ("{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], medium_dtype: float16}", "self_attn.o_proj",
     "MultiTierLinear"),
    ("{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], layout: banded}", "mlp.up_proj",
     "BandedLinear"),
    ("{method: rsparse, sparsity: 0.5}", "mlp.down_proj", "SparseLowRankLinear"),
    ("{method: cats, sparsity: 0.5}", "mlp.act_fn", "ThresholdedAct"),
])
def test_activation_sparsity_artifacts_restore_exactly(tmp_path, tokens, entry, module, kind):
    recipe = Recipe.from_yaml(f"passes: [{entry}]\ncalibration: {{samples: 4, seqlen: 16}}")
    model = tiny_model("llama")
    result = compress(model, recipe, calibration=torch.randint(0, 256, (4, 16)), progress=False)
    out = save_artifact(tmp_path / "act", model, None, recipe, result.report_dict())
    loaded = load(out)
    restored = loaded.model.layers[1].get_submodule(module)
    assert type(restored).__name__ == kind
    if hasattr(restored, "weight_medium"):  # the medium tier's storage dtype survives the round trip
        assert restored.weight_medium.dtype == model.model.layers[1].get_submodule(module).weight_medium.dtype
    if hasattr(restored, "mediums"):
        assert [m.dtype for m in restored.mediums] == [torch.float16] * 3
    if hasattr(restored, "weight_banded"):   # one fp16 matrix, no fp32 weight, in memory or on disk
        from safetensors import safe_open

        assert restored.weight_banded.dtype == torch.float16 and not hasattr(restored, "weight")
        with safe_open(out / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.endswith(f"{module}.weight")]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("entry", ["{method: dam, budget: 5.0, bits: 3, group_size: 32, factor_group: 32}",
                                   "{method: rtn, bits: 3, group_size: 32}", "{method: daws, sparsity: 0.5}"])
def test_artifacts_load_in_a_fresh_interpreter(tmp_path, tokens, entry):
    # nothing imported beforehand defines the sparsefx::* ops: loading must (DAM's restore runs its op once)
    import subprocess
    import sys

    recipe = Recipe.from_yaml(f"passes: [{entry}]\ncalibration: {{samples: 4, seqlen: 16}}")
    model = tiny_model("llama")
    result = compress(model, recipe, calibration=torch.randint(0, 256, (4, 16)), progress=False)
    out = save_artifact(tmp_path / "a", model, None, recipe, result.report_dict())
    from safetensors.torch import save_file

    with torch.no_grad():
        save_file({"tokens": tokens, "want": model(tokens).logits}, tmp_path / "io.safetensors")
    script = ("import sys, torch\nfrom safetensors.torch import load_file\nfrom sparsefx.artifact import load\n"
              "io = load_file(sys.argv[2])\nm = load(sys.argv[1])\nwith torch.no_grad():\n"
              "    got = m(io['tokens']).logits\n"
              "torch.testing.assert_close(got, io['want'], rtol=1e-5, atol=1e-5)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "io.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("entry", ["{method: rtn, bits: 3, group_size: 32}", "{method: daws, sparsity: 0.5}"])
def test_load_prepares_cpu_decode_and_the_prepared_model_saves_again(tmp_path, tokens, entry):
    from sparsefx.ops.quant.eager import QuantLinear
    from sparsefx.ops.routed.eager import TieredLinear

    recipe = Recipe.from_yaml(f"passes: [{entry}]\ncalibration: {{samples: 4, seqlen: 16}}")
    model = tiny_model("llama")
    result = compress(model, recipe, calibration=torch.randint(0, 256, (4, 16)), progress=False)
    out = save_artifact(tmp_path / "a", model, None, recipe, result.report_dict())

    raw, ready = load(out, prepare_decode=False), load(out)
    kinds = (QuantLinear, TieredLinear)
    compressed = [(a, b) for a, b in zip(raw.modules(), ready.modules()) if isinstance(b, kinds)]
    assert len(compressed) == 14
    assert all(a.decode_kernel is None and b.decode_kernel is not None for a, b in compressed)
    head = ready.lm_head.weight
    assert head.stride() == (1, head.shape[0]) and raw.lm_head.weight.is_contiguous()  # dense linears re-stored

    calls = 0

    def counting(kernel, width):
        def call(x, *args):
            nonlocal calls
            calls += x.numel() == width   # one-token calls
            return kernel(x, *args)
        return call

    for _, b in compressed:
        b.decode_kernel = counting(b.decode_kernel, b.in_features)
    prompt = tokens[:1, :10]   # more rows than the decode kernels take: the prompt is a GEMM
    with torch.no_grad():
        torch.testing.assert_close(ready(tokens).logits, raw(tokens).logits, rtol=1e-5, atol=1e-5)
        want = raw.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        got = ready.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    assert calls == 3 * len(compressed)   # the 3 one-token steps after the prompt go through the kernels

    if "rtn" in entry:   # opt-in int8 activations go through the same call
        q8 = torch.ops.sparsefx_cpu.quant_linear_q8.default
        assert all(m.decode_kernel is q8 for m in load(out, int8_activations=True).modules() if isinstance(m, kinds))
    with pytest.raises(ValueError, match="int8_activations"):
        load(out, prepare_decode=False, int8_activations=True)

    again = save_artifact(tmp_path / "b", ready, None, recipe, result.report_dict())
    with torch.no_grad():
        torch.testing.assert_close(load(again, prepare_decode=False)(tokens).logits, raw(tokens).logits,
                                   rtol=1e-5, atol=1e-5)


def test_teal_artifact_stores_no_medium_weights(tmp_path, tokens):
    from safetensors import safe_open

    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, medium_fraction: 0}]\n"
                              "calibration: {samples: 4, seqlen: 16}")
    model = tiny_model("llama")
    compress(model, recipe, calibration=torch.randint(0, 256, (4, 16)), progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert up.weight_medium.data_ptr() == up.weight.data_ptr()  # no copy of the weights for an empty tier
    out = save_artifact(tmp_path / "teal", model, None, recipe, {})
    if (out / "compressed.safetensors").exists():
        with safe_open(out / "compressed.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.endswith("weight_medium")]
    loaded = load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


GISP = Recipe.from_yaml("passes: [{method: gisp, sparsity: 0.4, steps: 2, level: 0.0}]\n"
                        "calibration: {samples: 8, seqlen: 24}")


@pytest.fixture
def structured(tmp_path):
    model = tiny_model("qwen2", layers=3)
    result = compress(model, GISP, calibration=torch.randint(0, 256, (8, 24)), progress=False)
    return model, save_artifact(tmp_path / "gisp", model, None, GISP, result.report_dict())


def test_structured_artifact_loads_any_level_without_recalibration(structured, tokens, tmp_path):
    import copy

    from sparsefx.passes.structured import shrink_model

    model, out = structured
    dense = load_artifact(out)
    with torch.no_grad():
        assert torch.equal(dense.model(tokens).logits, model(tokens).logits)
    for level in (0.2, 0.4):
        expect = copy.deepcopy(model)
        shrink_model(expect, expect.sparsefx_structure, level)
        got = load_artifact(out, level=level).model
        assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in expect.parameters())
        with torch.no_grad():
            assert torch.equal(got(tokens).logits, expect(tokens).logits)
    # saved at 0.2: smaller files, loads as it was saved, can still go further but not back
    small = load_artifact(out, level=0.2).model
    out2 = save_artifact(tmp_path / "gisp20", small, None, GISP, {})
    assert (out2 / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    with torch.no_grad():
        assert torch.equal(load_artifact(out2).model(tokens).logits, small(tokens).logits)
    assert load_artifact(out2, level=0.3).model.generate(tokens[:1, :4], max_new_tokens=3).shape == (1, 7)
    with pytest.raises(ArtifactError, match="cannot come back"):
        load_artifact(out2, level=0.1)


def test_structured_artifact_errors(structured, artifact):
    _, out = structured
    _, plain = artifact
    with pytest.raises(ArtifactError, match="no levels"):
        load_artifact(plain, level=0.2)
    with pytest.raises(ArtifactError, match="beyond this plan"):
        load_artifact(out, level=0.99)
    (out / "structure.json").write_text('{"groups": 3}')
    with pytest.raises(ArtifactError, match="malformed"):
        load_artifact(out, check=False)


def test_artifact_files_get_the_umask_modes_not_the_temp_dirs(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        model = tiny_model("llama")
        out = save_artifact(tmp_path / "shared", model, None, Recipe.from_yaml(
            "passes: [{method: magnitude, sparsity: 0.5}]"), {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_a_folder_with_artifact_files_but_no_manifest_does_not_load_as_a_plain_model(artifact):
    from sparsefx.models import load_model

    _, out = artifact
    (out / "config.json").write_text(json.dumps(tiny_model("qwen2").config.to_dict()))
    (out / "sparsefx.json").unlink()
    with pytest.raises(ArtifactError, match="no sparsefx.json manifest"):
        load_model(out)
    with pytest.raises(ArtifactError, match="has no sparsefx.json"):
        load(out)


def _edit_config(out, **changes):
    import hashlib

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((out / "sparsefx.json").read_text())      # "fixed" so the checksum passes
    manifest["files"]["config.json"] = hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
    (out / "sparsefx.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "no_such_act"}, r"config\.json does not describe a model transformers can build"),
    ({"intermediate_size": "wide"}, r"config\.json does not describe a model transformers can build"),
    ({"model_type": "no_such_arch"}, r"config\.json does not describe a model transformers can build"),
    ({"vocab_size": 100}, r"tensor \S+\.weight .* has shape \(256, 64\), but config\.json makes it \(100, 64\)"),
])
def test_an_edited_config_is_named(artifact, changes, message):
    _, out = artifact
    _edit_config(out, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(out)
