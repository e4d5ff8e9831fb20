"""Compressed-model artifacts: an HF folder (safetensors) plus recipe, report and a checksummed manifest.

    OUT/
      model.safetensors, config.json, tokenizer files   the compressed model (loads with safetensors only)
      calibration.safetensors                           activation statistics, when the recipe calibrated
      compressed.safetensors + compressed.json          state of compressed modules (e.g. DAWS tiers), if any
      recipe.yaml                                       the recipe that produced it
      report.json                                       per-pass reports
      sparsefx.json                                     manifest: format, version, sha256 of every file

The folder is written to a temporary sibling and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

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


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32, check: bool = True) -> Artifact:
    """Load an artifact written by ``save_artifact``; verify checksums first (``check=False`` skips that).

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
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True) if (path / "tokenizer_config.json").exists() \
            else None
    except (OSError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: the model files do not load ({exc}); re-run `sparsefx compress`") from exc
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


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The compressed HF model of an artifact, ready for ``generate()``; no recalibration.

    Example:
        >>> model = sparsefx.load("out/wanda50")  # doctest: +SKIP
    """
    return load_artifact(path, dtype).model


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
