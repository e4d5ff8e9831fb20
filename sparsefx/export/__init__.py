"""Exports of artifacts to the formats serving engines read: llama.cpp's GGUF (``gguf.py``)."""

from .gguf import GGUFExport, export_gguf

__all__ = ["GGUFExport", "export_gguf"]
