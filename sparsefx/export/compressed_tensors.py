"""Export an artifact as a compressed-tensors checkpoint (``sparsefx export DIR --format compressed-tensors -o OUT``),
the format vLLM (and transformers, through its compressed-tensors quantizer) reads.

The folder is an HF checkpoint: ``config.json`` carrying ``quantization_config`` (``quant_method:
compressed-tensors``, ``format: pack-quantized``, one config group per (bits, group size, symmetry) present, its
``targets`` the module names; unquantized linears under ``ignore``), sharded safetensors and the tokenizer. For each
quantized linear:

  weight_packed      int32   the codes, signed (ours minus 2**(bits-1)), packed by compressed-tensors' own
                             ``pack_to_int32`` (its layout, whatever version is installed)
  weight_scale       [out, in / group]: our fp16 scales, stored as float32 when the artifact's dense tensors are
                     float32 (so dequantizing gives exactly our weights in fp32) and as float16 otherwise
  weight_zero_point  (asymmetric) our zero points minus 2**(bits-1), packed along the rows as compressed-tensors does
  weight_shape       [out, in]

compressed-tensors dequantizes ``(q - zero_point) * scale``: with q and the zero point shifted by the same offset this
is our ``(code - zero) * scale``, so the export is exact for every bit width and group size sparsefx makes (vLLM's
kernels serve 4 and 8 bits; other widths load in transformers). N:M artifacts are written dense with their zeros.
Activation routing (DAWS, TEAL, CATS, R-Sparse), DAM and structurally pruned artifacts are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._cache import atomic_dir
from ..artifact import checkpoint_dtypes, load_artifact
from ..codegen.eager import compressed_modules
from ..errors import ExportError
from ..ops.nm.format import unpack_nm
from ..shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter
from .common import head_tied, refuse_structured, refuse_unsupported


@dataclass
class CTExport:
    path: Path
    schemes: dict[str, list[str]] = field(default_factory=dict)     # "w4 g32 sym" -> module names
    dense: int = 0

    def summary(self) -> str:
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()) / 2**20
        groups = ", ".join(f"{len(v)} linears {k}" for k, v in self.schemes.items()) or "no quantized linears"
        return f"wrote {self.path} ({size:.1f} MiB, compressed-tensors pack-quantized): {groups}, {self.dense} dense"


def _scheme_key(spec) -> str:
    return f"w{spec.bits} g{spec.group_size} {'sym' if spec.symmetric else 'asym'}"


def pack_quant_linear(qw, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors (``weight_packed``, ``weight_scale``, ``weight_shape``, ``weight_zero_point``)
    for one packed weight of ours."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, offset = qw.spec.bits, 2 ** (qw.spec.bits - 1)
    codes = (qw.codes().to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(codes, bits),
           "weight_scale": qw.scales.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if qw.zeros is not None:
        zp = (qw.zeros.to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).contiguous()
    return out


def export_compressed_tensors(artifact: str | Path, out: str | Path, overwrite: bool = False,
                              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> CTExport:
    """Write ``artifact`` as a compressed-tensors checkpoint folder at ``out`` (see the module docstring). The
    folder is built beside ``out`` and renamed into place: an interrupted export leaves nothing.

    Example:
        >>> export_compressed_tensors("out/gptq-w4-g64", "gptq4-ct").summary()  # doctest: +SKIP
    """
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    folder, out = Path(artifact), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or choose another -o")
    refuse_structured(folder, "compressed-tensors")
    art = load_artifact(folder)
    model = art.model
    dtypes = checkpoint_dtypes(folder)
    main_dtype = dtypes[None] or torch.float32
    scale_dtype = torch.float32 if main_dtype == torch.float32 else torch.float16
    result = CTExport(out)
    specs: dict[str, object] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    handled: set[str] = set()
    for name, m in compressed_modules(model).items():
        refuse_unsupported(name, m, "compressed-tensors")
        if m.kind == "quant_linear":
            qw = m.qweight
            key = _scheme_key(qw.spec)
            specs[key] = qw.spec
            result.schemes.setdefault(key, []).append(name)
            tensors += [(f"{name}.{k}", v) for k, v in pack_quant_linear(qw, scale_dtype).items()]
        else:   # N:M: the mask as zeros of a dense weight
            w = unpack_nm(m.nm_values, m.nm_index, m.n, m.m)
            tensors.append((f"{name}.weight", w.to(dtypes.get(f"{name}.weight") or main_dtype)))
            result.dense += 1
        if getattr(m, "bias", None) is not None:
            tensors.append((f"{name}.bias", m.bias.detach().to(dtypes.get(f"{name}.bias") or main_dtype)))
            handled.add(f"{name}.bias")
        handled.add(f"{name}.weight")
    tied = head_tied(model)
    for name, t in model.state_dict().items():
        if name in handled or (tied and name == "lm_head.weight"):
            continue
        t = t.detach()
        tensors.append((name, t.to(dtypes.get(name) or main_dtype) if t.is_floating_point() else t))
        if name.endswith(".weight") and t.dim() == 2:
            result.dense += 1

    quantized = {n for names in result.schemes.values() for n in names}
    linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    groups = {f"group_{i}": QuantizationScheme(
        targets=sorted(result.schemes[key]),
        weights=QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                                 group_size=spec.group_size))
        for i, (key, spec) in enumerate(specs.items())}
    qconfig = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                 ignore=sorted(n for n in linears if n not in quantized))
    config = model.config.to_dict()
    if not tied and config.get("tie_word_embeddings"):
        # the artifact's head is stored apart from the embeddings (a quantized head): loaders must not tie it back
        config["tie_word_embeddings"] = False
    config["dtype"] = str(main_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    import compressed_tensors

    config["quantization_config"] = {**qconfig.model_dump(), "version": compressed_tensors.__version__}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, "model", max_shard_size)
        for name, t in tensors:
            writer.add(name, t.contiguous())
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if art.tokenizer is not None:
            art.tokenizer.save_pretrained(tmp)
    return result


__all__ = ["CTExport", "export_compressed_tensors", "pack_quant_linear"]
