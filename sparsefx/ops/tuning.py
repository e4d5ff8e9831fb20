"""The autotune cache: the best kernel config per device, kernel and shape, written by ``sparsefx autotune`` and read
by the kernels' launchers at run time.

One JSON file (``$SPARSEFX_AUTOTUNE_CACHE``, default ``~/.cache/sparsefx/autotune.json``)::

    {"version": 1,
     "devices": {"NVIDIA H100 80GB HBM3": {"tiered_gemv": {"4096x11008|s50": {"config": {...}, "us": 12.3}}}}}

A key is the kernel's shape, and for activation-sparse kernels the sparsity bin (``s40``, ``s50``, ...): the best
split of work depends on how many rows are read. A launcher looks the key up and falls back to its heuristic when
the cache has no entry; a corrupt or foreign file is ignored with a warning (the kernels still run), never
unpickled — it is plain JSON. Writes go to a temporary file renamed over the old one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VERSION = 1
SPARSITY_BINS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)

_loaded: dict[str, object] = {}   # path -> (mtime, data)


def cache_path() -> Path:
    env = os.environ.get("SPARSEFX_AUTOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sparsefx" / "autotune.json"


def device_name(device: torch.device | str, kernel: str = "") -> str:
    """Cache key of a device: the CUDA device's name; ``cpu`` otherwise — ``cpu-interpret`` for Triton kernels under
    TRITON_INTERPRET=1, whose timings say nothing about real hardware (CPU kernels, ``cpu_*``, are real).

    Example:
        >>> device_name("cpu", "cpu_tiered_gemv")
        'cpu'
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu" and not kernel.startswith("cpu_") and os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu-interpret"
    return device.type


def sparsity_bin(sparsity: float) -> float:
    """The bin a measured sparsity falls in: the largest bin edge not above it."""
    return max(b for b in SPARSITY_BINS if b <= max(0.0, sparsity) + 1e-9)


def shape_key(shape: tuple, sparsity: float | None = None) -> str:
    key = "x".join(str(int(s)) for s in shape)
    return key if sparsity is None else f"{key}|s{round(sparsity_bin(sparsity) * 100)}"


def _read(path: Path) -> dict:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {"version": VERSION, "devices": {}}
    cached = _loaded.get(str(path))
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("devices"), dict):
            raise ValueError(f"not a version-{VERSION} sparsefx autotune cache")
    except (OSError, ValueError) as exc:
        log.warning("ignoring the autotune cache %s (%s); re-run `sparsefx autotune` to rebuild it", path, exc)
        data = {"version": VERSION, "devices": {}}
    _loaded[str(path)] = (mtime, data)
    return data


def lookup(kernel: str, device: torch.device | str, shape: tuple, sparsity: float | None = None) -> dict | None:
    """The tuned config of ``kernel`` for ``shape`` (and sparsity bin) on ``device``, or None. The cache file is
    read once per process (launchers call this on every launch); ``store`` and ``reload`` refresh it.

    Example:
        >>> lookup("tiered_gemv", "cpu", (4096, 11008), 0.5) is None or True
        True
    """
    config = _lookup(kernel, str(torch.device(device)), tuple(shape), sparsity)
    return None if config is None else dict(config)


@functools.lru_cache(maxsize=4096)
def _lookup(kernel: str, device: str, shape: tuple, sparsity: float | None) -> dict | None:
    entries = _read(cache_path())["devices"].get(device_name(device, kernel), {}).get(kernel, {})
    entry = entries.get(shape_key(shape, sparsity))
    return entry["config"] if isinstance(entry, dict) and isinstance(entry.get("config"), dict) else None


def reload() -> None:
    """Forget what was read from the cache file (the next lookup reads it again)."""
    _lookup.cache_clear()
    _loaded.clear()


def store(results: list[dict], device: torch.device | str, path: Path | None = None) -> Path:
    """Merge ``results`` (``{"kernel", "shape", "sparsity" (or None), "config", "us"}``) into the cache of
    ``device``; atomic write. Returns the cache path."""
    path = path or cache_path()
    data = _read(path)
    for r in results:
        per_device = data["devices"].setdefault(device_name(device, r["kernel"]), {})
        per_device.setdefault(r["kernel"], {})[shape_key(r["shape"], r.get("sparsity"))] = {
            "config": r["config"], "us": r["us"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    reload()
    return path


__all__ = ["SPARSITY_BINS", "VERSION", "cache_path", "device_name", "lookup", "reload", "shape_key", "sparsity_bin",
           "store"]
