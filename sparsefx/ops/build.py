"""Building the C++ kernels of the op families (``ops/<family>/*.cpp``, package data of the wheel).

``load_extension`` builds a family's source with ``torch.utils.cpp_extension.load`` under a name keyed by the
source's content and the build flags: an edited source is a new name (rebuilt once, then cached), and two checkouts
or environments sharing torch's build cache never rebuild each other's copy — no hand-bumped version suffixes.

A first build takes a minute or two on 2 cores and prints nothing (torch's own output is off), so one line says what
is happening when a load is slow; a cached build loads in well under a second and stays silent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# -fopenmp: at::parallel_for is inline and splits work between threads only where _OPENMP is defined (torch's
# cpp_extension does not add it; without it every kernel ran on one thread). The library it links is the libgomp.so.1
# torch has already loaded, so the kernels share torch's thread pool and its torch.set_num_threads.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")


@contextlib.contextmanager
def announce_if_slow(what: str, after_s: float = 3.0):
    """Log ``compiling <what> ...`` once if the block runs longer than ``after_s`` seconds (a compile, not a cache
    hit), from a timer thread, so a first run does not look hung."""
    timer = threading.Timer(after_s, log.info, ("compiling %s (once per environment: a minute or two on 2 cores)",
                                                what))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def local_includes(source: Path) -> list[Path]:
    """The files ``source`` includes with ``#include "..."`` (relative to the including file), theirs too."""
    found: list[Path] = []
    todo = [source]
    while todo:
        f = todo.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read_text(), flags=re.MULTILINE):
            dep = (f.parent / name).resolve()
            if dep.is_file() and dep not in found:
                found.append(dep)
                todo.append(dep)
    return found


def extension_name(stem: str, source: Path, defines: dict[str, int] | None = None) -> str:
    """``sparsefx_<stem>_<12 hex digits>``: the digits hash the source and the local headers it includes, the flags
    and the defines."""
    h = hashlib.sha256(source.read_bytes())
    for dep in local_includes(source):
        h.update(dep.read_bytes())
    h.update(repr((FLAGS, sorted((defines or {}).items()), torch.__version__)).encode())
    return f"sparsefx_{stem}_{h.hexdigest()[:12]}"


@functools.cache
def cpu_supports_kernels() -> bool:
    """Whether this CPU has the instructions the C++ kernels are built for (AVX2, FMA, F16C)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags and " f16c" in flags
    except OSError:
        return False


def load_extension(stem: str, source: Path, what: str, defines: dict[str, int] | None = None):
    """Build (or load the cached build of) the C++ file ``source`` and return its Python module; importing it
    registers the ``sparsefx_cpu::*`` ops it defines. Raises what the build raises."""
    from torch.utils.cpp_extension import load   # heavy (imports setuptools): only when a kernel is first needed

    if not source.is_file():
        raise FileNotFoundError(f"{source}: the C++ source of the {stem} kernels is missing from this installation "
                                "(reinstall sparsefx; a wheel ships it as package data)")
    cflags = [*FLAGS, *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]
    with announce_if_slow(what):
        return load(name=extension_name(stem, source, defines), sources=[str(source)], extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"], verbose=False)


def try_load_extension(stem: str, source: Path, what: str, defines: dict[str, int] | None = None):
    """``load_extension``, or None (with a warning naming why) where the kernels cannot run here: a CPU without
    AVX2/FMA/F16C, or a build that fails (no compiler). Callers then take the pure-torch path."""
    if not cpu_supports_kernels():
        return None
    try:
        return load_extension(stem, source, what, defines)
    except Exception as exc:  # no compiler: the reference path still gives correct results
        log.warning("%s unavailable (%s); using the pure-torch fallback", what, exc)
        return None


__all__ = ["FLAGS", "announce_if_slow", "cpu_supports_kernels", "extension_name", "load_extension",
           "try_load_extension"]
