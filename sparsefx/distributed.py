"""Calibration across processes with torch.distributed: ``torchrun --nproc-per-node N -m sparsefx compress ...``.

Every rank holds the whole (or, sequentially, the current block of the) model and a contiguous share of the
calibration samples. What a pass learns from calibration is a sum over tokens — ``‖X‖²`` and ``|x|`` histograms
(``calibrate.Observer``), ``XᵀX`` (``quantize.GramObserver``), block-output errors of the greedy allocation,
gradient scores — so each is all-reduced right after the calibration batches have run, and every rank then makes
the same decisions (masks, thresholds, codes) from the same numbers. Rank 0 writes the artifact. Gloo on CPU, NCCL
on CUDA. With one process (no ``torchrun``) every function here is a no-op.
"""

from __future__ import annotations

import os

import torch

from .errors import CalibrationError


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); return whether
    this process is one of several. Threads per process are divided so the ranks do not oversubscribe the cores."""
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return True


def shutdown() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


def shard_samples(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of calibration samples ``ids: [N, S]`` (all of them with one process).

    Example:
        >>> shard_samples(torch.zeros(8, 4, dtype=torch.long)).shape   # one process
        torch.Size([8, 4])
    """
    n = world_size()
    if n == 1:
        return ids
    if ids.shape[0] < n:
        raise CalibrationError(f"{ids.shape[0]} calibration samples cannot be split over {n} processes; use at most "
                               f"{ids.shape[0]} processes or more samples (calibration.samples)")
    return ids.tensor_split(n)[rank()]


def _backend_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """Reduce ``tensors`` in place over all ranks (``op``: ``sum`` or ``max``); a no-op with one process."""
    if world_size() == 1:
        return
    red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    dev = _backend_device()
    for t in tensors:
        buf = t if t.device == dev else t.to(dev)
        torch.distributed.all_reduce(buf, red)
        if buf is not t:
            t.copy_(buf)


def all_reduce_floats(values: list[float]) -> list[float]:
    """Sum each Python float over all ranks (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_([t])
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def reduce_observers(module: torch.nn.Module) -> None:
    """All-reduce the statistics of every observer inside ``module`` (anything with ``all_reduce_()``)."""
    if world_size() == 1:
        return
    for m in module.modules():
        fn = getattr(m, "all_reduce_", None)
        if callable(fn):
            fn()
