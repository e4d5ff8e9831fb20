"""Block-by-block compression for models larger than memory (``pipeline.compress_blocks``)."""

from .blocks import BlockCall, block_kwargs, find_blocks, head_inputs
from .pipeline import INPUTS, CheckpointSource, ModelSource, SequentialResult, compress_blocks

__all__ = ["BlockCall", "CheckpointSource", "INPUTS", "ModelSource", "SequentialResult", "block_kwargs",
           "compress_blocks", "find_blocks", "head_inputs"]
