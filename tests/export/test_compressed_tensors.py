"""compressed-tensors export: compressed-tensors' own decompression gives back our weights exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsefx.artifact import load_artifact
from sparsefx.cli import main
from sparsefx.errors import ExportError
from sparsefx.export import export_compressed_tensors


def _decompressed(folder):
    """The export loaded the way compressed-tensors' lifecycle does (quantization config applied to a fresh model,
    ``ModelCompressor.compress_model``, our tensors loaded strictly, ``decompress_model``)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())
                                                ["quantization_config"])
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(model, qconfig)
    mc = ModelCompressor(quantization_config=qconfig)
    mc.compress_model(model)
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(f))
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m]
    mc.decompress_model(model)
    return model.eval()


@pytest.mark.parametrize("arch,bits,group,symmetric", [
    ("llama", 4, 32, True), ("llama", 4, 32, False), ("qwen2", 8, 32, False), ("llama", 3, 32, False),
    ("mistral", 2, 32, True), ("llama", 8, 96, True),
])
def test_model_compressor_decompresses_our_weights_exactly(tmp_path, make_artifact, arch, bits, group, symmetric):
    """Every bit width and both symmetries; group 96 (only the MLP's down projection has 96 inputs here: the
    other linears stay dense and are listed under ``ignore``)."""
    p = {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric}
    art = make_artifact([{**p, "roles": ["down"]} if group == 96 else p], arch)
    report = export_compressed_tensors(art, tmp_path / "ct")
    assert list(report.schemes) == [f"w{bits} g{group} {'sym' if symmetric else 'asym'}"]
    ours = load_artifact(art).model
    theirs = _decompressed(tmp_path / "ct")
    for name in report.schemes[next(iter(report.schemes))]:
        assert torch.equal(theirs.get_submodule(name).weight, ours.get_submodule(name).qweight.dequantize()), name
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, ours(x).logits)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    dense = ["lm_head"] + ([f"model.layers.{i}.{m}" for i in range(2) for m in
                            ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                             "self_attn.q_proj", "self_attn.v_proj")] if group == 96 else [])
    assert cfg["ignore"] == sorted(dense)
    (weights,) = [g["weights"] for g in cfg["config_groups"].values()]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (bits, group, symmetric)


def test_transformers_loads_a_symmetric_export(tmp_path, make_artifact):
    """transformers' compressed-tensors quantizer loads the folder as it is (on CPU it decompresses): same logits.
    (Asymmetric exports: this transformers / compressed-tensors pair expects the zero points unpacked on load
    while compressed-tensors' own compressor packs them; vLLM reads them packed.)"""
    from transformers import AutoModelForCausalLM

    art = make_artifact()
    export_compressed_tensors(art, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, load_artifact(art).model(x).logits)


def test_masks_are_dense_zeros_and_bf16_stays_bf16(tmp_path, make_artifact):
    art = make_artifact([{"method": "magnitude", "pattern": "2:4"}], dtype=torch.bfloat16)
    report = export_compressed_tensors(art, tmp_path / "ct")
    assert not report.schemes
    state = load_file(tmp_path / "ct" / "model.safetensors")
    w = state["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16 and (w.reshape(-1, 4) == 0).sum(1).ge(2).all()
    ref = load_artifact(art).model.model.layers[0].mlp.down_proj
    dense = ref.weight if hasattr(ref, "weight") else None
    if dense is None:
        from sparsefx.ops.nm.format import unpack_nm
        dense = unpack_nm(ref.nm_values, ref.nm_index, ref.n, ref.m)
    assert torch.equal(w.float(), dense.float())
    assert "quantization_config" in json.loads((tmp_path / "ct" / "config.json").read_text())


@pytest.mark.parametrize("passes,match", [
    ([{"method": "daws", "sparsity": 0.5}], "activation routing"),
    ([{"method": "dam", "budget": 3.75, "bits": 3, "group_size": 32, "symmetric": True, "factor_bits": 4,
       "factor_group": 32}], "low-rank correction"),
])
def test_refusals_name_the_tensor_and_leave_nothing(tmp_path, make_artifact, passes, match):
    art = make_artifact(passes)
    with pytest.raises(ExportError, match=match) as info:
        export_compressed_tensors(art, tmp_path / "ct")
    assert "model.layers." in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_cli_and_existing_output(tmp_path, make_artifact, capsys, monkeypatch):
    art = make_artifact([{"method": "rtn", "bits": 4, "group_size": 32}])
    out = tmp_path / "ct"
    assert main(["export", str(art), "--format", "compressed-tensors", "-o", str(out)]) == 0
    assert "w4 g32 asym" in capsys.readouterr().out
    assert main(["export", str(art), "--format", "compressed-tensors", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    from sparsefx import shards

    def fail(self):
        raise KeyboardInterrupt

    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(shards.ShardWriter, "finish", fail)
    with pytest.raises(KeyboardInterrupt):
        export_compressed_tensors(art, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ct"]


@pytest.mark.real_model
def test_smollm2_export_loads_in_transformers_at_the_same_perplexity(tmp_path, smollm2, smollm2_q4_0):
    import dataclasses

    from transformers import AutoModelForCausalLM

    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.eval import perplexity

    _, tok = smollm2
    art = smollm2_q4_0
    export_compressed_tensors(art, tmp_path / "ct")
    windows = eval_windows(tok, dataclasses.replace(PROTOCOL, eval_tokens=2048))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ours = perplexity(load_artifact(art).model, windows, progress=False)[0]
    assert perplexity(loaded, windows, progress=False)[0] == pytest.approx(ours, rel=1e-6)


def test_a_quantized_head_of_a_tied_model_is_untied_in_the_export(tmp_path, make_artifact, head8):
    """SmolLM2-style tied embeddings with an 8-bit head: the export says tie_word_embeddings false, so loaders
    keep the quantized head instead of tying it back to the (dense) embeddings; transformers gives our logits."""
    from transformers import AutoModelForCausalLM

    art = make_artifact(head8, tied=True)
    report = export_compressed_tensors(art, tmp_path / "ct")
    assert "lm_head" in report.schemes["w8 g32 sym"]
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head" not in cfg["quantization_config"]["ignore"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, load_artifact(art).model(x).logits)
