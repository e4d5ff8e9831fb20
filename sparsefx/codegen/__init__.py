"""Lowering compressed graphs to something that runs: today the eager HF model; Triton/CPU kernels next."""

from .eager import lower_to_eager

__all__ = ["lower_to_eager"]
