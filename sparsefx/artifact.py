"""Compressed-model artifacts: an HF folder (safetensors) plus recipe, report and a checksummed manifest.

    OUT/
      model.safetensors, config.json, tokenizer files   the compressed model (loads with safetensors only)
      calibration.safetensors                           activation statistics, when the recipe calibrated
      compressed.safetensors + compressed.json          state of compressed modules (e.g. DAWS tiers), if any
      structure.json                                    structured removal (GISP): the ranking of heads and
                                                        channels and how much of it the stored weights have lost
      recipe.yaml                                       the recipe that produced it
      report.json                                       per-pass reports
      sparsefx.json                                     manifest: format, version, sha256 of every file

The folder is written to a temporary sibling and renamed into place, so it is either complete or absent.
A structurally pruned model stores smaller tensors than its (dense) ``config.json`` describes: it is rebuilt from the
config, shrunk by ``structure.json`` and then filled from ``model.safetensors``; ``load_artifact(level=...)``
removes further units of the ranking (nested subnetworks) without recalibration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._cache import atomic_dir
from .errors import ArtifactError
from .passes.calibrate import ActStats
from .passes.config import Recipe
from .passes.structured import STRUCTURE_ATTR

FORMAT, VERSION = "sparsefx-artifact", 1
MANIFEST = "sparsefx.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    model: nn.Module
    tokenizer: Any
    recipe: Recipe
    report: dict
    stats: dict[str, ActStats]
    manifest: dict


def save_artifact(out: str | Path, model: nn.Module, tokenizer, recipe: Recipe, report: dict,
                  stats: dict[str, ActStats] | None = None, overwrite: bool = False) -> Path:
    """Write a complete artifact to ``out`` atomically.

    Example:
        >>> save_artifact("out/wanda50", model, tok, recipe, result.report_dict())  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from . import __version__

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _save_compressed_modules(model, tmp)
        plan = getattr(model, STRUCTURE_ATTR, None)
        if plan is not None:
            (tmp / "structure.json").write_text(plan.to_json())
        if stats:
            tensors = {}
            for i, (name, s) in enumerate(sorted(stats.items())):
                tensors.update({k: v.contiguous() for k, v in s.tensors(f"input{i}").items()})
            save_file(tensors, tmp / "calibration.safetensors",
                      metadata={"inputs": json.dumps(sorted(stats))})
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "sparsefx": __version__, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _save_compressed_modules(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    from .codegen.eager import compressed_modules

    plan, tensors = {}, {}
    for name, module in compressed_modules(model).items():
        attrs, state = module.export_state()
        plan[name] = {"kind": module.kind, "attrs": attrs}
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in state.items()})
    if plan:
        save_file(tensors, folder / "compressed.safetensors")
        (folder / "compressed.json").write_text(json.dumps(plan, indent=1))


def _restore_compressed_modules(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    from .codegen.eager import EAGER_KINDS, replace_module

    if not (folder / "compressed.json").is_file():
        return
    plan = json.loads((folder / "compressed.json").read_text())
    tensors = load_file(folder / "compressed.safetensors")
    for name, entry in plan.items():
        cls = EAGER_KINDS[entry["kind"]]
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        replace_module(model, name, cls.restore(model.get_submodule(name), entry["attrs"], state))


@contextlib.contextmanager
def _quiet_missing_weights(path: Path):
    """Quantized linears store no dense weight: HF reports those weights missing (and initialises them) before
    ``_restore_compressed_modules`` replaces the linears. Silence that report for such artifacts only."""
    from transformers.utils import logging as hf_logging

    from .codegen.eager import EAGER_KINDS

    plan = path / "compressed.json"
    entries = json.loads(plan.read_text()).values() if plan.is_file() else ()
    if all(getattr(EAGER_KINDS.get(e.get("kind")), "stores_dense_weight", True) for e in entries):
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_structured(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild a structurally pruned model: dense skeleton from config.json, shrunk per structure.json, then the
    stored (smaller) tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .passes.structured import StructurePlan, shrink_to

    plan = StructurePlan.from_json((path / "structure.json").read_text())
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stored, plan.applied = plan.applied, 0
    shrink_to(model, plan, stored)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"stored tensors do not fit the pruned model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    setattr(model, STRUCTURE_ATTR, plan)
    return model


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32, check: bool = True,
                  level: float | None = None) -> Artifact:
    """Load an artifact written by ``save_artifact``; verify checksums first (``check=False`` skips that).

    ``level`` (structurally pruned artifacts): remove more of the ranking, up to that fraction of the prunable
    parameters — any level from the stored one up to the recipe's ``sparsity`` — without recalibration.

    Example:
        >>> art = load_artifact("out/wanda50")  # doctest: +SKIP
        >>> art.model.generate(...)  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder; pass the folder that `sparsefx compress -o` wrote")
    if not mpath.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not a sparsefx artifact (or written half-way); "
                            "re-run `sparsefx compress`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc}); re-run `sparsefx compress`") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                            f"{FORMAT} v{VERSION}; re-create it with this version of sparsefx")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; re-run `sparsefx compress`")
        if check and _sha256(f) != digest:
            raise ArtifactError(f"{path}: file {name} is corrupt (checksum mismatch); re-run `sparsefx compress`")
    structured = (path / "structure.json").is_file()
    if level is not None and not structured:
        raise ArtifactError(f"{path} was not pruned structurally (no structure.json), so it has no levels; "
                            "drop --level or compress with a gisp / structured_* recipe")
    try:
        if structured:
            model = _load_structured(path, dtype)
        else:
            with _quiet_missing_weights(path):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                             use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True) if (path / "tokenizer_config.json").exists() \
            else None
    except (OSError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: the model files do not load ({exc}); re-run `sparsefx compress`") from exc
    if level is not None:
        from .passes.structured import shrink_model

        plan = getattr(model, STRUCTURE_ATTR)
        try:
            shrink_model(model, plan, level)
        except ValueError as exc:
            raise ArtifactError(f"{path}: cannot load level {level}: {exc}") from None
    try:
        _restore_compressed_modules(model, path)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: compressed module state does not fit the model ({exc}); "
                            "re-run `sparsefx compress`") from exc
    stats: dict[str, ActStats] = {}
    cal = path / "calibration.safetensors"
    if cal.is_file():
        from safetensors import safe_open

        with safe_open(cal, "pt") as f:
            names = json.loads(f.metadata()["inputs"])
        tensors = load_file(cal)
        stats = {n: ActStats.from_tensors(tensors, f"input{i}") for i, n in enumerate(names)}
    recipe = Recipe.load(path / "recipe.yaml")
    report = json.loads((path / "report.json").read_text())
    return Artifact(model.eval(), tok, recipe, report, stats, manifest)


def load(path: str | Path, dtype: torch.dtype = torch.float32, level: float | None = None,
         prepare_decode: bool = True, int8_activations: bool = False) -> nn.Module:
    """The compressed HF model of an artifact, ready for ``generate()``; no recalibration.

    With ``prepare_decode`` (the default) the model is prepared for decoding on CPU
    (``codegen.cpu.prepare_cpu_decode``): one-token calls of its compressed linears go to the C++ kernels, and
    weights that those kernels read by input channel are re-stored transposed (same values, same memory). Without
    it, a quantized model decodes through the ops' default math, which dequantizes every weight on every call —
    slower than the dense model. ``prepare_decode=False`` keeps every tensor as the artifact stores it; outputs are
    the same either way up to fp32 summation order. ``load_artifact`` never prepares. ``int8_activations`` (opt-in)
    has quantized linears decode with their input rounded to int8 (see ``prepare_cpu_decode``).

    Example:
        >>> model = sparsefx.load("out/wanda50")  # doctest: +SKIP
        >>> small = sparsefx.load("out/gisp", level=0.3)  # doctest: +SKIP
    """
    if int8_activations and not prepare_decode:
        raise ValueError("int8_activations is a decode preparation: drop prepare_decode=False, or int8_activations")
    model = load_artifact(path, dtype, level=level).model
    if prepare_decode:
        from .codegen.cpu import prepare_cpu_decode

        prepare_cpu_decode(model, int8_activations=int8_activations)
    return model


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
