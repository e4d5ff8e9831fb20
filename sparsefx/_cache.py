"""Cache directory and atomic writes shared by model, data and artifact code."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of sparsefx's cache: ``$SPARSEFX_CACHE`` or ``~/.cache/sparsefx``.

    Example:
        >>> cache_dir().name  # doctest: +SKIP
        'sparsefx'
    """
    root = os.environ.get("SPARSEFX_CACHE") or os.path.join(Path.home(), ".cache", "sparsefx")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``final``; rename it to ``final`` only if the block succeeds.

    A crash half-way leaves no partial ``final`` behind, only a temp folder that is removed.

    Example:
        >>> with atomic_dir(Path("/tmp/out")) as tmp:  # doctest: +SKIP
        ...     (tmp / "a.txt").write_text("hi")
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (CLI: --overwrite) or choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
