"""GGUF export: ggml blocks against our dequantization, the transformers round trip, and the refusals."""

from __future__ import annotations

import gguf
import pytest
import torch

from sparsefx.artifact import load_artifact
from sparsefx.cli import main
from sparsefx.errors import ExportError
from sparsefx.export import export_gguf
from sparsefx.export.gguf import qk_permutation, quant_to_ggml
from sparsefx.ops.quant.format import QuantizedWeight, QuantSpec


def _random_qweight(rows, cols, bits, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, group, symmetric)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g)
    scales = torch.rand(rows, cols // group, generator=g) * 0.1 + 1e-3
    if symmetric:
        scales = scales * torch.where(torch.rand(scales.shape, generator=g) < 0.3, -1.0, 1.0)
    zeros = torch.randint(0, 2 ** bits, (rows, cols // group), generator=g)
    return QuantizedWeight.from_codes(codes, scales, zeros, spec)


@pytest.mark.parametrize("bits,group,symmetric,rows,cols", [
    (4, 32, True, 23, 96), (3, 96, True, 7, 192), (2, 64, True, 5, 128), (8, 32, True, 9, 64),
    (4, 32, False, 23, 96), (3, 64, False, 11, 128), (2, 32, False, 3, 32),
])
def test_blocks_decode_to_our_weights(bits, group, symmetric, rows, cols):
    """gguf's own dequantization of the blocks equals ours: bit for bit for Q4_0 / Q8_0, within fp16 rounding of
    the offset for Q4_1 — on fresh random codes, scales (both signs when symmetric) and zeros, odd row counts."""
    for seed in range(3):
        qw = _random_qweight(rows, cols, bits, group, symmetric, seed)
        blocks, tname, exact, _ = quant_to_ggml(qw)
        assert tname == ("Q8_0" if bits == 8 else "Q4_0" if symmetric else "Q4_1")
        got = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[tname]).copy())
        ref = qw.dequantize()
        assert got.shape == ref.shape
        if symmetric:
            assert exact and torch.equal(got, ref)
        else:
            assert not exact
            offset = (qw.zeros.float() * qw.scales.float()).abs().repeat_interleave(group, 1)
            # |fp16(m) - m| <= half an fp16 ulp of m (2**-11 relative), plus fp32 rounding of q*d + m (|.| < 2)
            assert ((got - ref).abs() <= offset * 2 ** -11 + 1e-6).all()


def test_permuted_rows_keep_their_groups():
    qw = _random_qweight(16, 64, 4, 32, True, 0)
    perm = qk_permutation(16, 2)
    blocks, tname, _, _ = quant_to_ggml(qw, perm)
    got = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[tname]).copy())
    assert torch.equal(got, qw.dequantize()[perm])


def test_qk_permutation_is_llama_cpps():
    """llama.cpp's converter: reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2) (a reference written out)."""
    w = torch.randn(24, 5)
    n_head = 3
    ref = w.reshape(n_head, 2, 24 // n_head // 2, 5).swapaxes(1, 2).reshape(24, 5)
    assert torch.equal(w[qk_permutation(24, n_head)], ref)


def _round_trip(tmp_path, art, **kw):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gguf" / "m.gguf"
    report = export_gguf(art, out, tokenizer_pre="gpt-2", **kw)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ref = load_artifact(art).model
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        return report, ref(x).logits, loaded(x).logits


@pytest.mark.parametrize("arch,bits,symmetric,gtype", [
    ("llama", 4, True, "Q4_0"), ("llama", 3, True, "Q4_0"), ("llama", 8, True, "Q8_0"),
    ("qwen2", 2, True, "Q4_0"), ("mistral", 4, True, "Q4_0"),
])
def test_exact_formats_round_trip_through_transformers(tmp_path, make_artifact, arch, bits, symmetric, gtype):
    """transformers' GGUF loader (which undoes llama.cpp's q/k row order) gives the artifact's logits exactly."""
    art = make_artifact([{"method": "rtn", "bits": bits, "group_size": 32, "symmetric": symmetric}], arch)
    report, ref, got = _round_trip(tmp_path, art)
    assert {t.gguf_type for t in report.tensors if t.source.endswith("proj.weight")} == {gtype}
    assert all(t.exact for t in report.tensors)
    assert torch.equal(got, ref)


def test_a_quantized_head_becomes_output_weight(tmp_path, make_artifact):
    """Q4_0 layers (llama.cpp's scale rule) and an 8-bit symmetric LM head: output.weight is Q8_0, all exact."""
    art = make_artifact([
        {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "scale": "signed_max"},
        {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True, "roles": ["lm_head"]}])
    report, ref, got = _round_trip(tmp_path, art)
    types = {t.name: t.gguf_type for t in report.tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and all(t.exact for t in report.tensors)
    assert torch.equal(got, ref)


def test_a_quantized_head_of_a_tied_model(tmp_path, make_artifact, head8):
    """Tied embeddings, 8-bit head: token_embd stays dense, output.weight is the Q8_0 head; same logits."""
    art = make_artifact(head8, tied=True)
    report, ref, got = _round_trip(tmp_path, art)
    types = {t.name: t.gguf_type for t in report.tensors}
    assert (types["output.weight"], types["token_embd.weight"]) == ("Q8_0", "F32")
    assert torch.equal(got, ref)


def test_asymmetric_formats_report_their_error(tmp_path, make_artifact):
    art = make_artifact([{"method": "rtn", "bits": 4, "group_size": 32}])
    report, ref, got = _round_trip(tmp_path, art)
    quant = [t for t in report.tensors if t.gguf_type == "Q4_1"]
    assert len(quant) == 14 and not any(t.exact for t in quant)
    assert all(0 < t.max_abs_err < 1e-3 and t.rel_err < 1e-3 for t in quant)
    assert "not bit-exact" in report.summary()
    assert 0 < (got - ref).abs().max() < 0.05

    art8 = make_artifact([{"method": "rtn", "bits": 8, "group_size": 32}], name="a8")
    report8 = export_gguf(art8, tmp_path / "a8.gguf", tokenizer_pre="gpt-2")
    q8 = [t for t in report8.tensors if t.gguf_type == "Q8_0"]
    assert len(q8) == 14 and all("requantized" in t.note and 0 < t.rel_err < 0.02 for t in q8)


def test_masks_and_dense_weights_keep_their_dtype(tmp_path, make_artifact):
    """A 2:4 artifact stored in bf16: its packed N:M linears and dense tensors come out as BF16 with the zeros."""
    art = make_artifact([{"method": "magnitude", "pattern": "2:4"}], dtype=torch.bfloat16)
    out = tmp_path / "m.gguf"
    report = export_gguf(art, out, tokenizer_pre="gpt-2")
    types = {t.gguf_type for t in report.tensors if t.source.endswith("proj.weight")}
    assert types == {"BF16"}
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w = torch.from_numpy(t.data.copy()).view(torch.bfloat16).reshape(64, 96)
    ref = load_artifact(art).model.model.layers[0].mlp.down_proj
    dense = ref.weight if hasattr(ref, "weight") else None
    if dense is None:
        from sparsefx.ops.nm.format import unpack_nm
        dense = unpack_nm(ref.nm_values, ref.nm_index, ref.n, ref.m)
    assert torch.equal(w.float(), dense.float()) and (w.reshape(-1, 4) == 0).sum(1).ge(2).all()


def test_metadata_and_tokenizer(tmp_path, make_artifact):
    art = make_artifact()
    out = tmp_path / "m.gguf"
    export_gguf(art, out, tokenizer_pre="gpt-2")
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.embedding_length"] == 64 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 256
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_unknown_pre_tokenizer_is_named(tmp_path, make_artifact):
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        export_gguf(make_artifact(), tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("passes,match", [
    ([{"method": "cats", "sparsity": 0.5}], "thresholded_act.*cannot represent"),
    ([{"method": "daws", "sparsity": 0.5}], "tiered_linear|multitier_linear|banded_linear"),
    ([{"method": "dam", "budget": 3.75, "bits": 3, "group_size": 32, "symmetric": True, "factor_bits": 4, "factor_group": 32}], "low-rank correction"),
])
def test_what_gguf_cannot_hold_is_refused_by_tensor(tmp_path, make_artifact, passes, match):
    art = make_artifact(passes)
    with pytest.raises(ExportError, match=match) as info:
        export_gguf(art, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert "model.layers." in str(info.value)
    assert not (tmp_path / "m.gguf").exists()


def test_structured_and_unsupported_architectures_are_refused(tmp_path, make_artifact):
    art = make_artifact(arch="gemma3", name="g")
    with pytest.raises(ExportError, match="gemma3.*supported: llama, mistral, qwen2"):
        export_gguf(art, tmp_path / "g.gguf", tokenizer_pre="gpt-2")
    (art / "structure.json").write_text("{}")
    with pytest.raises(ExportError, match="structurally"):
        export_gguf(art, tmp_path / "g.gguf", tokenizer_pre="gpt-2")


def test_existing_output_and_interrupted_export(tmp_path, make_artifact, monkeypatch):
    art = make_artifact()
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(ExportError, match="--overwrite"):
        export_gguf(art, out, tokenizer_pre="gpt-2")
    assert out.read_bytes() == b"keep"

    def fail(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(art, out, overwrite=True, tokenizer_pre="gpt-2")
    assert out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "m.gguf"]


def test_cli(tmp_path, make_artifact, capsys):
    art = make_artifact()
    out = tmp_path / "m.gguf"
    assert main(["export", str(art), "--format", "gguf", "-o", str(out), "--tokenizer-pre", "gpt-2",
                 "--quiet"]) == 0
    assert "Q4_0" in capsys.readouterr().out and out.is_file()
    assert main(["export", str(art), "--format", "gguf", "-o", str(out), "--tokenizer-pre", "gpt-2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(art), "--format", "gguf", "--level", "0.2", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--level" in capsys.readouterr().err
    assert main(["export", str(art), "-o", str(tmp_path / "x")]) == 2
    assert "add --level" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_q4_0_round_trip_perplexity(tmp_path, smollm2, smollm2_q4_0):
    """SmolLM2 through rtn-w4-g32-sym: the exported GGUF, loaded by transformers, scores the protocol's first
    2,048 tokens at the artifact's perplexity; the tokenizer is recognised as llama.cpp's "smollm"."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from sparsefx.data import PROTOCOL, eval_windows
    from sparsefx.eval import perplexity

    _, tok = smollm2
    art = smollm2_q4_0
    report = export_gguf(art, tmp_path / "g" / "m.gguf")
    assert report.tokenizer_pre == "smollm" and report.file_type == "Q4_0"
    assert all(t.exact for t in report.tensors)
    windows = eval_windows(tok, dataclasses.replace(PROTOCOL, eval_tokens=2048))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = perplexity(load_artifact(art).model, windows, progress=False)[0]
    assert perplexity(loaded, windows, progress=False)[0] == pytest.approx(ours, rel=1e-6)
