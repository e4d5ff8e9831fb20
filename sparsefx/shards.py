"""Sharded safetensors in the Hugging Face layout, read lazily and written one shard at a time.

    STEM.safetensors                                   one file, or
    STEM-00001-of-00003.safetensors ...                shards
    STEM.safetensors.index.json                        {"metadata": {"total_size": N}, "weight_map": {name: file}}

``TensorStore`` reads such a set (an HF checkpoint's ``model`` tensors, an artifact's ``model`` or ``compressed``
tensors): it checks the index against the files first, then hands out tensors by name, opening each shard only
while it reads from it, so a 13 GB checkpoint costs no memory until a block asks for its tensors.
``ShardWriter`` streams each tensor's bytes to disk as it is added and closes a shard when the next tensor would
pass ``max_shard_size``; ``finish`` gives the shards their final names and writes the index. The writer holds no
tensor, so writing costs no memory beyond the tensor being added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from .errors import ArtifactError

DEFAULT_MAX_SHARD_SIZE = 2**30   # bytes per shard file (the writer streams: it holds none in memory)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, field: str = "size") -> int:
    """``"2GB" -> 2_000_000_000``, ``"512MiB" -> 536_870_912``, ``1000 -> 1000``; anything else is refused.

    Example:
        >>> parse_size("1.5GB")
        1500000000
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{field}: expected a positive size such as 2GB, 500MB or 4GiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def format_size(nbytes: float) -> str:
    """``1536 * 2**20 -> '1.50 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


class ShardError(ArtifactError):
    """A sharded tensor set is incomplete or its index does not match its files."""


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


class TensorStore:
    """The tensors of ``folder/STEM*.safetensors``, by name, read on demand.

    Example:
        >>> store = TensorStore("ckpt/")                                  # doctest: +SKIP
        >>> store.load(["model.embed_tokens.weight"], dtype=torch.float32)  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, stem: str = "model", what: str = "checkpoint"):
        from safetensors import SafetensorError, safe_open

        self.folder, self.stem, self.what = Path(folder), stem, what
        index = self.folder / index_name(stem)
        single = self.folder / f"{stem}.safetensors"
        self.weight_map: dict[str, str] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                wmap = data["weight_map"]
                if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                    raise TypeError("weight_map is not a mapping of tensor name -> file name")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ShardError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); "
                                 f"re-save the {what} (save_pretrained writes a correct one)") from None
            files = sorted(set(wmap.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise ShardError(f"{self.folder}: shard(s) {missing[:3]} listed in {index.name} are missing; copy "
                                 f"the complete {what} (all {len(files)} shards)")
        elif single.is_file():
            files, wmap = [single.name], None
        else:
            strays = sorted(p.name for p in self.folder.glob(f"{stem}-*.safetensors"))
            hint = (f"; found shards {strays[:2]} but no {index.name}: the index is missing" if strays else "")
            raise ShardError(f"{self.folder} holds no {stem}.safetensors or {index.name}{hint}")
        for fname in files:
            try:
                with safe_open(self.folder / fname, "pt") as f:
                    held = set(f.keys())
                    for key in held:
                        sl = f.get_slice(key)
                        self.meta[key] = (_DTYPES.get(sl.get_dtype(), None), tuple(sl.get_shape()))
                        if wmap is None:
                            self.weight_map[key] = fname
            except (SafetensorError, OSError) as exc:
                raise ShardError(f"{self.folder / fname} is not a readable safetensors file ({exc}); re-save the "
                                 f"{what}") from None
            if wmap is not None:
                listed = [k for k, v in wmap.items() if v == fname]
                absent = [k for k in listed if k not in held]
                if absent:
                    raise ShardError(f"{index}: tensor {absent[0]!r} (and {len(absent) - 1} more) is mapped to "
                                     f"{fname}, which does not hold it; the index does not match the shards — "
                                     f"re-save the {what}")
        if wmap is not None:
            self.weight_map = dict(wmap)
            stray = sorted(set(self.meta) - set(wmap))
            if stray:
                raise ShardError(f"{index} does not list tensor {stray[0]!r} that a shard holds; the index does "
                                 f"not match the shards — re-save the {what}")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def dtype(self, name: str) -> torch.dtype | None:
        return self.meta[name][0]

    def nbytes(self, names=None) -> int:
        total = 0
        for name in (self.weight_map if names is None else names):
            dt, shape = self.meta[name]
            n = 1
            for s in shape:
                n *= s
            total += n * (dt.itemsize if dt is not None else 1)
        return total

    def floating_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the bytes (a bf16 checkpoint with fp32 norms is bf16)."""
        by: dict[torch.dtype, int] = {}
        for name, (dt, _) in self.meta.items():
            if dt is not None and dt.is_floating_point:
                by[dt] = by.get(dt, 0) + self.nbytes([name])
        return max(by, key=by.get) if by else torch.float32

    def load(self, names, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
             ) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``names``, floating tensors cast to ``dtype``; each shard opened once, then closed
        (its pages are unmapped, so memory holds only the returned tensors)."""
        from safetensors import safe_open

        names = list(names)
        absent = [n for n in names if n not in self.weight_map]
        if absent:
            raise ShardError(f"{self.folder}: the {self.what} has no tensor {absent[0]!r}"
                             f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; it does not fit the "
                             "model's config.json — re-save the complete model")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(self.folder / fname, "pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    # .clone() when nothing else copied: a tensor still backed by the mapped file would pin it
                    out[k] = t.to(device) if str(device) != "cpu" else (t if t.dtype != self.dtype(k) else t.clone())
        return out

    def iter_files(self, digests: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Each shard's tensors, reading every file exactly once. With ``digests`` (``{file: sha256}``), a shard's
        bytes are checked against its digest before any of its tensors is handed out."""
        from safetensors.torch import load as load_bytes

        for fname in self.files:
            data = (self.folder / fname).read_bytes()
            if digests is not None:
                if fname not in digests:
                    raise ShardError(f"{self.folder}: {fname} is not listed in the manifest; re-run "
                                     "`sparsefx compress`")
                if hashlib.sha256(data).hexdigest() != digests[fname]:
                    raise ShardError(f"{self.folder}: file {fname} is corrupt (checksum mismatch); re-run "
                                     "`sparsefx compress`")
            tensors = load_bytes(data)
            del data
            yield fname, tensors


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# safetensors' names of torch dtypes, for writing (its file format: an 8-byte little-endian header length, a JSON
# header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors' bytes)
_ST_DTYPES = {dtype: name for name, dtype in _DTYPES.items()}


class ShardWriter:
    """Write tensors as HF-style shards of at most ``max_shard_size`` bytes (a tensor larger than that gets a shard
    of its own), streamed: each tensor's bytes go to disk when it is added, so the writer holds no tensor — memory
    does not grow with the shard size (or, for a model smaller than one shard, with the model).

    ``safetensors.torch.save_file`` needs every tensor of a file in memory at once; this writes the same format
    (read back by ``safetensors`` itself) from spill files: one per element size, joined largest first behind the
    header as ``save_file`` orders them, so every tensor stays aligned to its element size in the file.

    Example:
        >>> w = ShardWriter(tmp, "model", 2 * 2**30)  # doctest: +SKIP
        >>> w.add("lm_head.weight", weight); w.finish()  # doctest: +SKIP
        ['model.safetensors']
    """

    def __init__(self, folder: str | Path, stem: str = "model", max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        self.folder, self.stem, self.max_shard_size = Path(folder), stem, int(max_shard_size)
        self.pending: dict[str, tuple[str, list[int], int, int]] = {}   # name -> (dtype, shape, elem size, nbytes)
        self.pending_bytes = 0
        self._spill: dict[int, object] = {}                              # element size -> open spill file
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self.names: set[str] = set()

    def _spill_path(self, size: int) -> Path:
        return self.folder / f".{self.stem}-part{len(self.parts):05d}.{size}.spill"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice to {self.stem}")
        t = tensor.detach()
        if t.dtype not in _ST_DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
        size = t.element_size()
        nbytes = t.numel() * size
        if self.pending and self.pending_bytes + nbytes > self.max_shard_size:
            self.flush()
        f = self._spill.get(size)
        if f is None:
            f = self._spill[size] = open(self._spill_path(size), "wb")
        if nbytes:
            # a uint8 view of the same memory: its buffer is written as is, without a copy
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.pending[name] = (_ST_DTYPES[t.dtype], list(t.shape), size, nbytes)
        self.pending_bytes += nbytes
        self.total_size += nbytes
        self.names.add(name)

    def flush(self) -> None:
        """Write the tensors added so far as one shard (under a temporary name until ``finish``)."""
        import shutil

        if not self.pending:
            return
        for f in self._spill.values():
            f.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        order = sorted(self._spill, reverse=True)            # 8-byte elements first, then 4, 2, 1: all aligned
        for size in order:
            for name, (dtype, shape, esize, nbytes) in self.pending.items():
                if esize == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                         # the data starts 8-byte aligned, as save_file does
        path = self.folder / f".{self.stem}-part{len(self.parts):05d}.safetensors"
        with open(path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for size in order:
                with open(self._spill_path(size), "rb") as src:
                    shutil.copyfileobj(src, out, 16 * 2**20)
        for size in order:
            self._spill_path(size).unlink()
        self._spill = {}
        self.parts.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as HF does and write the index (none for a single file); return the file names."""
        self.flush()
        n = len(self.parts)
        if n == 0:
            return []
        if n == 1:
            final = f"{self.stem}.safetensors"
            os.replace(self.parts[0][0], self.folder / final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.parts, 1):
            final = f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / final)
            files.append(final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / index_name(self.stem)).write_text(json.dumps(index, indent=1))
        return files + [index_name(self.stem)]

    def abort(self) -> None:
        for f in self._spill.values():
            f.close()
        for size in self._spill:
            with contextlib.suppress(FileNotFoundError):
                self._spill_path(size).unlink()
        self._spill = {}
        for path, _ in self.parts:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.pending = {}
