"""sparsefx: a compression compiler for LLMs."""
