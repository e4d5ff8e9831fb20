"""What the Triton kernels of the op families share (``ops/<family>/triton.py``: routed — tiered GEMV and the
union-of-kept-channels GEMM, the multitier and banded GEMVs; quant — dequant-matmul with DAM's fused low-rank
epilogue; nm — the N:M matmul): whether they can run here, the K-split heuristics, the fp32 output buffer.

Kernels run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (slow; how CI checks them). Each is launched from an
opaque ``torch.library.custom_op`` with a fake implementation (``sparsefx::triton_*``), which works under eager,
aot_eager and Inductor — a ``triton_op`` does not under the interpreter. Block sizes come from the autotune cache
(``ops/tuning.py``) when ``sparsefx autotune`` has filled it for the device and shape, else from a heuristic.

Importing this module does not import triton; ``available()`` says whether the kernels can run here.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read when kernels are
    defined, i.e. before the kernel modules are first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: CUDA if present, else CPU): CUDA with triton
    installed, or CPU under the interpreter.

    Example:
        >>> available("cpu") == (triton_importable() and interpreting())
        True
    """
    if not triton_importable():
        return False
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error when a kernel is asked to run where Triton cannot."""
    for t in tensors:
        if t is not None and not available(t.device):
            raise RuntimeError(f"Triton kernels cannot run on {t.device}: "
                               + ("install triton" if not triton_importable() else
                                  "set TRITON_INTERPRET=1 before the first kernel runs to use them on CPU (slow), or "
                                  "use the CPU kernels (kernels='cpu')"))


# A decode GEMV is latency bound unless enough loads are in flight: about 16 programs per SM of a large GPU.
TARGET_PROGRAMS = 2048


def splits_for(blocks: int, k: int, block_k: int) -> int:
    """Heuristic K split: enough programs (``TARGET_PROGRAMS``) when ``blocks`` output blocks alone are too few, at
    most 32 splits and at least one ``block_k`` block each.

    Example:
        >>> splits_for(256, 4096, 256)
        8
    """
    return max(1, min(32, -(-TARGET_PROGRAMS // blocks), k // block_k))


def k_chunks(k: int, block_k: int, split: int) -> tuple[int, int]:
    """Each K split's length (a whole number of ``block_k`` blocks, so that splits do not overlap) and the number of
    splits that remain non-empty.

    Example:
        >>> k_chunks(1000, 64, 3)
        (384, 3)
    """
    chunk = -(-(-(-k // max(1, split))) // block_k) * block_k
    return chunk, -(-k // chunk)


def output_buffer(out: torch.Tensor | None, shape: tuple, device, zero: bool = False) -> torch.Tensor:
    """The fp32 output buffer: ``out`` if given (checked), else new; zeroed when programs accumulate into it."""
    if out is None:
        return (torch.zeros if zero else torch.empty)(shape, dtype=torch.float32, device=device)
    if out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {shape}, got {tuple(out.shape)} {out.dtype}")
    return out.zero_() if zero else out
