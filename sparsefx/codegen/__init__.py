"""Lowering compressed graphs to something that runs, driven by the op registry (``sparsefx/ops``): the eager HF
model (``eager.py``), a model prepared for the CPU decode kernels (``cpu.py``), the ``torch.compile`` backend
(``backend.py``) and the ``sparsefx autotune`` runs (``autotune.py``)."""

from .eager import lower_to_eager

__all__ = ["lower_to_eager"]
