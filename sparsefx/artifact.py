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

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._cache import atomic_dir
from .codegen.cpu import prepare_cpu_decode
from .codegen.eager import EAGER_KINDS, compressed_modules, replace_module
from .errors import ArtifactError
from .passes.calibrate import ActStats
from .passes.config import Recipe
from .passes.structured import shrink_model, shrink_to, STRUCTURE_ATTR, StructurePlan
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, TensorStore, index_name

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


class ArtifactWriter:
    """An artifact's tensors, written piece by piece into ``folder`` (the temporary folder of ``atomic_dir``): the
    whole-model ``save_artifact`` writes the whole model at once, the sequential pipeline one block at a time.

    Dense tensors go to ``model*.safetensors`` (the HF layout, sharded past ``max_shard_size``) in their checkpoint
    dtype (``dtypes``: one dtype, or ``{name: dtype}`` per tensor, a default under ``None``); the state of compressed
    modules goes to ``compressed*.safetensors`` as it is (its formats fix their own dtypes), described by
    ``compressed.json``. A tensor shared by two names (tied embeddings) is written once, under its first name.

    Example:
        >>> w = ArtifactWriter(tmp, dtypes=torch.bfloat16)   # doctest: +SKIP
        >>> w.add_module(layer, prefix="model.layers.3.")    # doctest: +SKIP
    """

    def __init__(self, folder: Path, dtypes=None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        self.folder = Path(folder)
        self.dtypes = dtypes
        self.dense = ShardWriter(self.folder, "model", max_shard_size)
        self.compressed = ShardWriter(self.folder, "compressed", max_shard_size)
        self.plan: dict[str, dict] = {}
        self.stats: dict[str, ActStats] = {}

    def dtype_for(self, name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point() or self.dtypes is None:
            return t.dtype
        if isinstance(self.dtypes, torch.dtype):
            return self.dtypes
        return self.dtypes.get(name) or self.dtypes.get(None) or t.dtype

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        """One dense tensor, cast to its checkpoint dtype."""
        if t.device.type == "meta":
            raise ValueError(f"tensor {name} was never loaded (still on the meta device)")
        self.dense.add(name, t.to(self.dtype_for(name, t)))

    def add_module(self, module: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        """``module``'s persistent state (its names prefixed by ``prefix``) and its compressed modules' state. A
        tensor that two names share inside ``module`` (tied embeddings) is written once, under its first name (the
        loader ties it again from ``config.tie_word_embeddings``)."""
        seen: set[tuple] = set()    # only within this call: a freed tensor's address is reused by the next block
        for name, t in module.state_dict(prefix=prefix, keep_vars=True).items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if name in skip or (t.device.type != "meta" and key in seen):
                continue
            seen.add(key)
            self.add_tensor(name, t.detach())
        for name, m in compressed_modules(module).items():
            full = f"{prefix}{name}" if name else prefix.rstrip(".")   # "" is ``module`` itself (a compressed head)
            attrs, state = m.export_state()
            self.plan[full] = {"kind": m.kind, "attrs": attrs}
            for k, v in state.items():
                self.compressed.add(f"{full}.{k}", v.detach())

    def finish(self, config, tokenizer, recipe: Recipe, report: dict, generation_config=None,
               structure: str | None = None) -> None:
        """Write the shards' final names, indexes, config, tokenizer, recipe, report, statistics and manifest."""
        from safetensors.torch import save_file

        from . import __version__   # lazy: the package imports this module while it initialises

        self.dense.finish()
        self.compressed.finish()
        if self.plan:
            (self.folder / "compressed.json").write_text(json.dumps(self.plan, indent=1))
        config = copy.deepcopy(config)
        stored = self._stored_dtype()
        if stored is not None:
            config.dtype = stored
        config.save_pretrained(self.folder)
        if generation_config is not None:
            generation_config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if structure is not None:
            (self.folder / "structure.json").write_text(structure)
        if self.stats:
            tensors = {}
            for i, (name, s) in enumerate(sorted(self.stats.items())):
                tensors.update({k: v.contiguous() for k, v in s.tensors(f"input{i}").items()})
            save_file(tensors, self.folder / "calibration.safetensors",
                      metadata={"inputs": json.dumps(sorted(self.stats))})
        (self.folder / "recipe.yaml").write_text(recipe.to_yaml())
        (self.folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
        files = {p.name: _sha256(p) for p in sorted(self.folder.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "sparsefx": __version__, "files": files}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))

    def _stored_dtype(self) -> torch.dtype | None:
        if isinstance(self.dtypes, torch.dtype):
            return self.dtypes
        if isinstance(self.dtypes, dict):
            counts: dict[torch.dtype, int] = {}
            for d in self.dtypes.values():
                if d is not None and d.is_floating_point:
                    counts[d] = counts.get(d, 0) + 1
            return max(counts, key=counts.get) if counts else None
        return None


def save_artifact(out: str | Path, model: nn.Module, tokenizer, recipe: Recipe, report: dict,
                  stats: dict[str, ActStats] | None = None, overwrite: bool = False, dtypes=None,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a complete artifact to ``out`` atomically.

    ``dtypes``: the dtype dense tensors are stored in — one ``torch.dtype`` or ``{name: dtype}`` (a checkpoint's own,
    ``checkpoint_dtypes``), default: as they are in ``model``. ``max_shard_size`` (bytes): shard above it.

    Example:
        >>> save_artifact("out/wanda50", model, tok, recipe, result.report_dict())  # doctest: +SKIP
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ArtifactWriter(tmp, dtypes, max_shard_size)
        writer.add_module(model)
        writer.stats = dict(stats or {})
        plan = getattr(model, STRUCTURE_ATTR, None)
        writer.finish(model.config, tokenizer, recipe, report,
                      generation_config=getattr(model, "generation_config", None),
                      structure=plan.to_json() if plan is not None else None)
    return out


def checkpoint_dtypes(folder: str | Path) -> dict:
    """``{tensor name: dtype}`` of an HF checkpoint's safetensors (headers only; ``None`` -> the main float dtype),
    for ``save_artifact(dtypes=...)``: what was bf16 stays bf16."""
    store = TensorStore(folder)
    return {**{k: store.dtype(k) for k in store.keys()}, None: store.floating_dtype()}


def _restore_compressed_modules(model: nn.Module, folder: Path, digests: dict[str, str] | None = None) -> None:
    if not (folder / "compressed.json").is_file():
        return
    plan = json.loads((folder / "compressed.json").read_text())
    by_module: dict[str, dict[str, torch.Tensor]] = {name: {} for name in plan}
    stored = (folder / "compressed.safetensors").is_file() or (folder / index_name("compressed")).is_file()
    for _, tensors in (TensorStore(folder, "compressed", "artifact").iter_files(digests) if stored else ()):
        for key, t in tensors.items():
            module, _, attr = key.rpartition(".")
            if module not in by_module:
                raise KeyError(f"compressed tensor {key} belongs to no module of compressed.json")
            by_module[module][attr] = t
    for name, entry in plan.items():
        cls = EAGER_KINDS[entry["kind"]]
        replace_module(model, name, cls.restore(model.get_submodule(name), entry["attrs"], by_module[name]))


_TENSOR_FILE = re.compile(r"^(model|compressed)(-\d+-of-\d+)?\.safetensors$")


def _load_model(path: Path, dtype: torch.dtype, digests: dict[str, str] | None, device=None) -> nn.Module:
    """Build the model from ``config.json`` without allocating weights (meta device), shrink it per
    ``structure.json`` if the artifact was pruned structurally, then fill it shard by shard: every file is read once
    (and checked against its digest in that same read), its tensors cast to ``dtype`` and assigned, not copied."""
    from transformers import AutoConfig

    from .models import empty_model, tie_embeddings   # lazy: models imports this module (MANIFEST)

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = empty_model(config, dtype)
    except Exception as exc:    # transformers raises many types here (ValueError, KeyError, its validation errors)
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
        raise ArtifactError(f"{path / 'config.json'} does not describe a model transformers can build "
                            f"({type(exc).__name__}: {reason}); it was changed after `sparsefx compress` wrote it: "
                            "restore it, or re-run `sparsefx compress`") from exc
    plan = None
    if (path / "structure.json").is_file():
        plan = StructurePlan.from_json((path / "structure.json").read_text())
        stored, plan.applied = plan.applied, 0
        shrink_to(model, plan, stored)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for fname, tensors in TensorStore(path, "model", "artifact").iter_files(digests):
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(f"{fname} holds tensor {unexpected[0]!r}, which the model of config.json does not have")
        for k, t in tensors.items():
            if tuple(t.shape) != expected[k]:
                raise ArtifactError(f"{path}: tensor {k} in {fname} has shape {tuple(t.shape)}, but config.json "
                                    f"makes it {expected[k]}: config.json and the weights disagree (was config.json "
                                    "edited?); restore it, or re-run `sparsefx compress`")
            if t.is_floating_point() and t.dtype != dtype:
                tensors[k] = t.to(dtype)
            if device is not None:
                tensors[k] = tensors[k].to(device)
        model.load_state_dict(tensors, strict=False, assign=True)
    tie_embeddings(model)
    try:
        _restore_compressed_modules(model, path, digests)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: compressed module state does not fit the model ({exc}); "
                            "re-run `sparsefx compress`") from exc
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"the artifact holds no tensor for {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    if plan is not None:
        setattr(model, STRUCTURE_ATTR, plan)
    return model


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32, check: bool = True,
                  level: float | None = None, device: str | torch.device | None = None) -> Artifact:
    """Load an artifact written by ``save_artifact``, checking every file's checksum (``check=False`` skips that).

    Tensor files are read once each: checked and loaded in the same read, into a model built without weights, so
    loading needs the model's memory plus one shard. ``dtype``: the dtype to compute in (default fp32: this CPU has
    no fast bf16 math; the artifact may store bf16). ``device``: where the tensors go (default CPU).
    ``level`` (structurally pruned artifacts): remove more of the ranking, up to that fraction of the prunable
    parameters — any level from the stored one up to the recipe's ``sparsity`` — without recalibration.

    Example:
        >>> art = load_artifact("out/wanda50")  # doctest: +SKIP
        >>> art.model.generate(...)  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

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
    files = manifest.get("files", {})
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; re-run `sparsefx compress`")
        # tensor files are checked while they are loaded (one read each); the small files here
        if check and not _TENSOR_FILE.match(name) and _sha256(f) != digest:
            raise ArtifactError(f"{path}: file {name} is corrupt (checksum mismatch); re-run `sparsefx compress`")
    structured = (path / "structure.json").is_file()
    if level is not None and not structured:
        raise ArtifactError(f"{path} was not pruned structurally (no structure.json), so it has no levels; "
                            "drop --level or compress with a gisp / structured_* recipe")
    try:
        model = _load_model(path, dtype, files if check else None, device)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True) if (path / "tokenizer_config.json").exists() \
            else None
    except ArtifactError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: the model files do not load ({exc}); re-run `sparsefx compress`") from exc
    if level is not None:
        plan = getattr(model, STRUCTURE_ATTR)
        try:
            shrink_model(model, plan, level)
        except ValueError as exc:
            raise ArtifactError(f"{path}: cannot load level {level}: {exc}") from None
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
         prepare_decode: bool = True, int8_activations: bool = False,
         device: str | torch.device | None = None) -> nn.Module:
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
    model = load_artifact(path, dtype, level=level, device=device).model
    if prepare_decode and next(model.parameters()).device.type == "cpu":
        prepare_cpu_decode(model, int8_activations=int8_activations)
    return model


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
