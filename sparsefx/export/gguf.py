"""Export an artifact to llama.cpp's GGUF (``sparsefx export DIR --format gguf -o model.gguf``).

What maps onto GGUF, and how exactly (ggml's blocks hold 32 weights of one row):

  sparsefx tensor                                   GGUF type   exact?
  quantized, symmetric, 2/3/4 bits, any group       Q4_0        yes: a block's ``d`` is its group's fp16 scale, its
                                                                codes are ours shifted by 8 - 2**(bits-1)
  quantized, asymmetric, 2/3/4 bits, any group      Q4_1        codes and ``d`` yes; ``m`` = -zero * scale rounded
                                                                to fp16 (ggml stores the offset, we the zero point):
                                                                the error is measured and reported per tensor
  quantized, symmetric, 8 bits                      Q8_0        yes: codes - 128 as int8, ``d`` = scale
  quantized, asymmetric, 8 bits                     Q8_0        requantized (codes - zero need 9 bits): error reported
  N:M packed (weight masks)                         dense       yes: the zeros written out
  dense linears, embeddings                         F32/F16/BF16 as the artifact stores them; norms always F32

Every group size sparsefx uses is a multiple of 32, so a group is a whole number of ggml blocks that repeat its
scale. A 2- or 3-bit artifact stored as Q4 keeps its values but not its size (llama.cpp's 2/3-bit types are
K-quants with 256-weight super-blocks and 6-bit sub-scales, which our groups do not map onto).

What does not map: activation-routed linears (DAWS, TEAL, CATS, R-Sparse: llama.cpp has no per-token channel
skipping), DAM's low-rank correction, and structurally pruned artifacts (per-layer head counts): the export refuses
them, naming the tensor and why. Architectures: llama (Llama, SmolLM, and Mistral, which llama.cpp runs as llama) and
qwen2. llama.cpp's llama keeps q/k rows in an interleaved rotary order: those rows are permuted as its converter
does (codes, scales and zeros alike; a row permutation moves whole groups).

The tokenizer goes in as llama.cpp's converter writes it: byte-level BPE as ``gpt2`` with its pre-tokenizer named
by the same fingerprint (the hash of a fixed text's token ids), byte-fallback BPE (Llama-2/Mistral) as ``llama``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..artifact import checkpoint_dtypes, load_artifact
from ..codegen.eager import compressed_modules
from ..errors import ExportError
from ..ops.nm.format import unpack_nm
from ..ops.quant.format import QuantizedWeight
from .common import head_tied, refuse_structured, refuse_unsupported, text_config

log = logging.getLogger(__name__)

BLOCK = 32
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTE_QK = {"llama"}

# llama.cpp's pre-tokenizer names by the fingerprint its converter computes (convert_hf_to_gguf.py,
# get_vocab_base_pre): sha256 of str(tokenizer.encode(CHECK_TEXT)). The families sparsefx targets.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",      # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",          # Mistral Nemo
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}


@dataclass
class TensorRecord:
    """One written tensor: GGUF name, the artifact tensor it came from, its GGUF type, whether the values are
    carried over exactly, and the largest absolute difference to the artifact's values (0 when exact)."""

    name: str
    source: str
    gguf_type: str
    exact: bool
    max_abs_err: float = 0.0
    rel_err: float = 0.0           # RMS of the difference / RMS of the weight
    note: str = ""


@dataclass
class GGUFExport:
    path: Path
    tensors: list[TensorRecord] = field(default_factory=list)
    file_type: str = ""
    tokenizer_pre: str | None = None

    def summary(self) -> str:
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.gguf_type] = by_type.get(t.gguf_type, 0) + 1
        inexact = [t for t in self.tensors if not t.exact]
        lines = [f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, {self.file_type}): "
                 + ", ".join(f"{n} {k}" for k, n in sorted(by_type.items()))]
        if inexact:
            worst = max(inexact, key=lambda t: t.rel_err)
            lines.append(f"{len(inexact)} tensors not bit-exact ({worst.note}); worst {worst.name}: max |diff| "
                         f"{worst.max_abs_err:.3g}, RMS diff / RMS weight {worst.rel_err:.3g}")
        else:
            lines.append("every tensor carried over exactly")
        return "\n".join(lines)


# --- quantized weights -> ggml blocks ---------------------------------------------------------------------------


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama keeps q/k projections in: per head, HF's two rotary halves interleaved
    (``new[i] = old[perm[i]]``)."""
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def _block_scales(per_group: torch.Tensor, group_size: int, n_blocks: int) -> np.ndarray:
    """``[rows, groups]`` -> ``[rows, n_blocks, 2]`` bytes of the fp16 value of each block's group."""
    idx = torch.arange(n_blocks) * BLOCK // group_size
    return per_group[:, idx].to(torch.float16).contiguous().numpy().view(np.uint8).reshape(-1, n_blocks, 2)


def quant_to_ggml(qw: QuantizedWeight, perm: torch.Tensor | None = None):
    """``(blocks: uint8 [rows, bytes per row], ggml type name, exact, note)`` for a packed weight; ``perm``: a row
    order to write it in. Raises ``ExportError`` for a group size that is not a multiple of 32."""
    spec = qw.spec
    rows, cols = qw.shape
    if spec.group_size % BLOCK or cols % BLOCK:
        raise ExportError(f"group size {spec.group_size} over {cols} columns is not a whole number of ggml's "
                          f"{BLOCK}-weight blocks")
    codes, scales = qw.codes(), qw.scales
    zeros = qw.zeros
    if perm is not None:
        codes, scales = codes[perm], scales[perm]
        zeros = None if zeros is None else zeros[perm]
    nb = cols // BLOCK
    d = _block_scales(scales.float(), spec.group_size, nb)
    if spec.bits <= 4:
        q = codes if zeros is not None else codes + (8 - 2 ** (spec.bits - 1))
        qb = q.reshape(rows, nb, BLOCK).numpy()
        qs = (qb[..., :16] | (qb[..., 16:] << 4)).astype(np.uint8)
        if zeros is None:
            return np.concatenate([d, qs], -1).reshape(rows, -1), "Q4_0", True, ""
        m = _block_scales(-(zeros.float() * scales.float()), spec.group_size, nb)
        return (np.concatenate([d, m, qs], -1).reshape(rows, -1), "Q4_1", False,
                "Q4_1 stores the offset -zero*scale in fp16")
    if zeros is None:       # 8 bits, symmetric: zero 128
        qs = (codes.to(torch.int16) - 128).to(torch.int8).reshape(rows, nb, BLOCK).numpy().view(np.uint8)
        return np.concatenate([d, qs], -1).reshape(rows, -1), "Q8_0", True, ""
    return None, "Q8_0", False, "asymmetric 8-bit requantized to Q8_0 (codes - zero need 9 bits)"


def _error(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    diff = (got - ref).float()
    rms = float(ref.float().pow(2).mean().sqrt()) or 1.0
    return float(diff.abs().max()), float(diff.pow(2).mean().sqrt()) / rms


# --- tokenizer ----------------------------------------------------------------------------------------------------


def _add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, pre: str | None) -> str | None:
    import gguf

    tj = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else None
    if tj is None:
        raise ExportError(f"{folder} has no tokenizer.json; GGUF embeds the tokenizer: re-save the artifact's "
                          "tokenizer with a fast (tokenizers) backend")
    model_type = tj["model"]["type"]
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel" or \
        "ByteLevel" in json.dumps(tj.get("decoder") or {})
    if model_type == "BPE" and not tj["model"].get("byte_fallback") and byte_level:
        if pre is None:
            fingerprint = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
            pre = PRE_TOKENIZERS.get(fingerprint)
            if pre is None:
                raise ExportError(
                    f"the tokenizer's pre-tokenizer (fingerprint {fingerprint[:16]}…) is not one llama.cpp names in "
                    f"this table ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); pass --tokenizer-pre NAME "
                    "with the name llama.cpp's convert_hf_to_gguf.py gives your model's tokenizer")
        vocab = tokenizer.get_vocab()
        added = tokenizer.get_added_vocab()
        specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        by_id = {i: t for t, i in vocab.items()}
        tokens, types = [], []
        for i in range(vocab_size):
            t = by_id.get(i)
            if t is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif t in added:
                tokens.append(t)
                types.append(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(t)
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        if not special.merges:      # a pure byte vocabulary: llama.cpp still wants the key (an empty list)
            writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
        special.add_to_gguf(writer, quiet=True)
        return pre
    if model_type == "BPE" and tj["model"].get("byte_fallback"):
        hf = gguf.vocab.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in hf.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return "default"
    raise ExportError(f"tokenizer model {model_type!r} (tokenizer.json) has no GGUF export here: byte-level BPE "
                      "(Llama 3, Qwen2, SmolLM) and byte-fallback BPE (Llama 2, Mistral) are supported")


# --- the export ---------------------------------------------------------------------------------------------------


def _writer(arch: str):
    """gguf's writer, able to write an empty array (a typed count of 0, which the format allows and gguf-py's
    writer refuses): a byte-level tokenizer without merges needs ``tokenizer.ggml.merges = []``."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(None, arch)


def _metadata(writer, text, arch: str, name: str) -> None:
    rope = getattr(text, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ExportError(f"rope scaling {rope_type!r} is not exported yet (llama.cpp needs its frequency factors); "
                          "only models with plain RoPE can be exported to GGUF for now")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(text, "rope_theta", 10000.0)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_feed_forward_length(int(text.intermediate_size))
    writer.add_block_count(int(text.num_hidden_layers))
    writer.add_head_count(int(text.num_attention_heads))
    writer.add_head_count_kv(int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(text.vocab_size))
    if head_dim * text.num_attention_heads != text.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def _dense_array(t: torch.Tensor, dtype: torch.dtype):
    """``(array, raw ggml type or None, type name)`` of a dense tensor stored as ``dtype`` (1-D: F32, as llama.cpp
    keeps norms)."""
    import gguf

    if t.dim() == 1 or dtype == torch.float32:
        return t.float().contiguous().numpy(), None, "F32"
    if dtype == torch.float16:
        return t.half().contiguous().numpy(), None, "F16"
    if dtype == torch.bfloat16:
        raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(t.shape[0], -1), gguf.GGMLQuantizationType.BF16, "BF16"
    return t.float().contiguous().numpy(), None, "F32"


def export_gguf(artifact: str | Path, out: str | Path, overwrite: bool = False, tokenizer_pre: str | None = None,
                progress: bool = False) -> GGUFExport:
    """Write ``artifact`` as one GGUF file at ``out`` (see the module docstring for what maps how). The file is
    written under a temporary name beside ``out`` and renamed into place: an interrupted export leaves nothing.

    Example:
        >>> export_gguf("out/rtn-w4-g32", "rtn4.gguf").summary()  # doctest: +SKIP
    """
    import gguf

    folder, out = Path(artifact), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another -o")
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF file name ends in .gguf")
    refuse_structured(folder, "GGUF")
    art = load_artifact(folder)
    model, config = art.model, art.model.config
    arch = GGUF_ARCH.get(config.model_type)
    if arch is None:
        raise ExportError(f"architecture {config.model_type!r} has no GGUF export here; supported: "
                          f"{', '.join(sorted(GGUF_ARCH))}")
    text = text_config(model)
    n_head = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_head
    dtypes = checkpoint_dtypes(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     text.num_hidden_layers)
    result = GGUFExport(out)

    def gguf_name(hf: str) -> str:
        n = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if n is None:
            raise ExportError(f"tensor {hf} has no GGUF name for the {arch} architecture")
        return n

    def permutation(hf: str, rows: int):
        if arch not in PERMUTE_QK:
            return None
        if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return qk_permutation(rows, n_head)
        if hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return qk_permutation(rows, n_kv)
        return None

    tensors: list[tuple[str, np.ndarray, object]] = []
    kinds: dict[str, int] = {}
    handled: set[str] = set()
    for mname, m in compressed_modules(model).items():
        hf = f"{mname}.weight"
        refuse_unsupported(mname, m, "llama.cpp (GGUF)")
        if m.kind == "quant_linear":
            qw = m.qweight
            perm = permutation(hf, qw.shape[0])
            blocks, tname, exact, note = quant_to_ggml(qw, perm)
            ref = qw.dequantize()
            if perm is not None:
                ref = ref[perm]
            if blocks is None:      # requantize
                blocks = gguf.quants.quantize(ref.numpy(), gguf.GGMLQuantizationType[tname])
            got = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[tname]).copy())
            err = (0.0, 0.0) if exact else _error(ref, got.reshape(ref.shape))
            if exact and not torch.equal(got.reshape(ref.shape), ref):
                raise AssertionError(f"{mname}: {tname} blocks do not decode to the artifact's weight")
            tensors.append((gguf_name(hf), blocks, gguf.GGMLQuantizationType[tname]))
            result.tensors.append(TensorRecord(gguf_name(hf), hf, tname, exact, *err, note=note))
            kinds[tname] = kinds.get(tname, 0) + 1
        elif m.kind == "nm_linear":
            w = unpack_nm(m.nm_values, m.nm_index, m.n, m.m)
            perm = permutation(hf, w.shape[0])
            arr, raw, tname = _dense_array(w if perm is None else w[perm], dtypes.get(hf) or dtypes[None])
            tensors.append((gguf_name(hf), arr, raw))
            result.tensors.append(TensorRecord(gguf_name(hf), hf, tname, True, note="N:M mask as zeros"))
            kinds[tname] = kinds.get(tname, 0) + 1
        handled.add(hf)
        if getattr(m, "bias", None) is not None:
            b = m.bias.detach()
            perm = permutation(f"{mname}.bias", b.shape[0])
            tensors.append((gguf_name(f"{mname}.bias"), (b if perm is None else b[perm]).float().numpy(), None))
            result.tensors.append(TensorRecord(gguf_name(f"{mname}.bias"), f"{mname}.bias", "F32", True))
            handled.add(f"{mname}.bias")

    tied = head_tied(model)
    for hf, t in model.state_dict().items():
        if hf in handled or (tied and hf == "lm_head.weight") or hf.endswith("rotary_emb.inv_freq"):
            continue
        t = t.detach()
        perm = permutation(hf, t.shape[0])
        arr, raw, tname = _dense_array(t if perm is None else t[perm], dtypes.get(hf) or dtypes[None])
        tensors.append((gguf_name(hf), arr, raw))
        result.tensors.append(TensorRecord(gguf_name(hf), hf, tname, True))
        if t.dim() == 2:
            kinds[tname] = kinds.get(tname, 0) + 1

    file_type = max(kinds, key=kinds.get) if kinds else "F32"
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    result.file_type = file_type

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = _writer(arch)
    try:
        _metadata(writer, text, arch, art.recipe.name or folder.name)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        result.tokenizer_pre = _add_tokenizer(writer, folder, art.tokenizer, int(text.vocab_size), tokenizer_pre)
        for name, arr, raw in tensors:
            writer.add_tensor(name, arr, raw_dtype=raw)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return result


__all__ = ["GGUFExport", "TensorRecord", "export_gguf", "qk_permutation", "quant_to_ggml"]
