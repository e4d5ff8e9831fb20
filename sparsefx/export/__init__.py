"""Exports of artifacts to the formats serving engines read: llama.cpp's GGUF (``gguf.py``) and vLLM's
compressed-tensors (``compressed_tensors.py``). What neither can hold (activation routing, DAM, structured pruning) is
refused by name (``common.py``)."""

from .compressed_tensors import CTExport, export_compressed_tensors
from .gguf import GGUFExport, export_gguf

__all__ = ["CTExport", "GGUFExport", "export_compressed_tensors", "export_gguf"]
