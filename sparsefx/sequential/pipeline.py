"""The sequential pipeline: compress a model one decoder block at a time, so memory is bounded by one block.

    top      the model's own code up to the first block (embeddings, rotary tables, masks) on the calibration ids,
             blocks stubbed out (``blocks.block_kwargs``): each block's keyword arguments and the embeddings
    block i  onload block i (from the checkpoint's safetensors, or to the device) in fp32 -> capture it as its
             own IR (``ir.capture_stage``) -> the recipe's passes, the very pass objects and pass manager of a
             whole-model run, with the block's inputs as calibration (``BlockInputs``) -> lower onto the block
             (``lower_to_eager``) -> its outputs become block i+1's inputs -> write its tensors, free it
    head     what the LM head receives (final norm by the model's own code); the passes that select ``lm_head``
             run on a graph of the head alone
    rest     embeddings, final norm and LM head tensors are written in their checkpoint dtype

Calibration inputs flow block to block. By default (``inputs="compressed"``) block i sees the outputs of the
already compressed blocks before it, as GPTQ's sequential loop and llm-compressor's sequential pipeline do: a
block's compression then corrects for the error the earlier blocks made, and the statistics describe the inputs
the compressed model really feeds it. ``inputs="dense"`` feeds every block the dense model's hidden states
instead (the dense block is run once more before its compression) — the statistics a whole-model run collects,
so its result equals the whole-model one up to fp32 summation order.

Passes that change parameter shapes (GISP, ``structured_*``) rank units over the whole model and are refused here,
with the memory a whole-model run needs (``memory.estimate``).
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from .._cache import atomic_dir
from ..artifact import ArtifactWriter, checkpoint_dtypes
from ..codegen.eager import lower_to_eager
from ..errors import CalibrationError, RecipeError
from ..ir.capture import capture_stage
from ..models import empty_model, tie_embeddings
from ..passes.base import PassContext, PassReport, merge_reports
from ..passes.calibrate import STATS, ActStats, BlockInputs
from ..passes.config import build_pass, Recipe
from ..pipeline import _manager, build_pipeline
from ..shards import DEFAULT_MAX_SHARD_SIZE, ShardError, TensorStore
from .blocks import BlockCall, block_kwargs, find_blocks, head_inputs, text_config

log = logging.getLogger(__name__)
INPUTS = ("compressed", "dense")
COMPUTE_DTYPE = torch.float32   # statistics, thresholds and Hessians need fp32; bf16 stays the storage format


@dataclass
class SequentialResult:
    """Merged per-pass reports, calibration statistics (keyed ``block:input``) and timings of a sequential run."""

    reports: list[PassReport]
    stats: dict[str, ActStats] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def report_dict(self) -> dict:
        return {"passes": [r.to_dict() for r in self.reports], "sequential": self.info}


class ModelSource:
    """Blocks of a model already in memory; with ``device`` (a GPU), each block is onloaded for its turn and
    offloaded afterwards, so the device holds one block at a time (CPU offloading)."""

    writes = False

    def __init__(self, model: nn.Module, device=None):
        self.model = model
        self.path, self.blocks = find_blocks(model)
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self._moved: list[nn.Module] = []

    def start(self) -> None:
        """Put the small modules that run outside the blocks (norms, rotary tables) on the device."""
        if self.device == self.home:
            return
        big = {id(self.blocks), id(self.model.get_input_embeddings()), id(self.model.get_output_embeddings())}
        for m in _outside(self.model, big):
            m.to(self.device)
            self._moved.append(m)

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        return emb(ids.to(emb.weight.device)).to(self.device, COMPUTE_DTYPE)

    def end_embeddings(self, writer) -> None:
        pass

    def block(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device, COMPUTE_DTYPE)

    def end_block(self, i: int, writer) -> None:
        self.blocks[i].to(self.home)

    def head(self) -> nn.Module:
        return self.model.get_output_embeddings().to(self.device, COMPUTE_DTYPE)

    def finish(self, writer, head_compressed: bool) -> None:
        self.model.get_output_embeddings().to(self.home)
        for m in self._moved:
            m.to(self.home)


class CheckpointSource:
    """Blocks streamed from an HF checkpoint folder (``model.safetensors`` or shards + index): the model is built
    on the meta device, and each block's tensors are read when its turn comes and dropped after it was written.
    Dense tensors are written in their checkpoint dtype."""

    writes = True

    def __init__(self, folder, device=None):
        from transformers import AutoConfig

        self.folder = folder
        self.store = TensorStore(folder)
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.model = empty_model(self.config, COMPUTE_DTYPE)
        self.tied = tie_embeddings(self.model)
        self.path, self.blocks = find_blocks(self.model)
        self.device = torch.device(device or "cpu")
        names = {m: n for n, m in self.model.named_modules()}
        self.embed_name = names[self.model.get_input_embeddings()]
        self.head_name = names[self.model.get_output_embeddings()]
        self._empty: dict[int, nn.Module] = {}
        missing = [k for k in self._keys(self.model) if k not in self.store and not self._tied_head(k)]
        if missing:
            raise ShardError(f"{folder}: the checkpoint has no tensor {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} that its "
                              "config.json asks for; re-save the complete model")

    def _tied_head(self, name: str) -> bool:
        return self.tied and name == f"{self.head_name}.weight"

    @staticmethod
    def _keys(module: nn.Module, prefix: str = "") -> list[str]:
        return list(module.state_dict(prefix=prefix, keep_vars=True))

    def _fill(self, module: nn.Module, prefix: str) -> None:
        """Read ``module``'s tensors (names under ``prefix``) from the checkpoint, fp32, onto the device."""
        names = self._keys(module, prefix)
        src = {n: (f"{self.embed_name}.weight" if self._tied_head(n) else n) for n in names}
        got = self.store.load(sorted(set(src.values())), COMPUTE_DTYPE, self.device)
        module.load_state_dict({n[len(prefix):]: got[s] for n, s in src.items()}, strict=True, assign=True)

    def start(self) -> None:
        big = {id(self.blocks), id(self.model.get_input_embeddings()), id(self.model.get_output_embeddings())}
        for m in _outside(self.model, big):
            prefix = next(n for n, x in self.model.named_modules() if x is m)
            if self._keys(m):
                self._fill(m, f"{prefix}." if prefix else "")
            m.to(self.device)

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        if emb.weight.device.type == "meta":
            self._fill(emb, f"{self.embed_name}.")
        return emb(ids.to(self.device)).to(COMPUTE_DTYPE)

    def end_embeddings(self, writer) -> None:
        """The embeddings are no longer needed in fp32: drop them (the tie, if any, is rebuilt for the head)."""
        emb = self.model.get_input_embeddings()
        emb.weight = nn.Parameter(emb.weight.to("meta"), requires_grad=False)
        if self.tied:
            self.model.get_output_embeddings().weight = emb.weight

    def block(self, i: int) -> nn.Module:
        self._empty[i] = copy.deepcopy(self.blocks[i])        # meta tensors: costs nothing
        self._fill(self.blocks[i], f"{self.path}.{i}.")
        return self.blocks[i]

    def end_block(self, i: int, writer) -> None:
        if writer is not None:
            writer.add_module(self.blocks[i], prefix=f"{self.path}.{i}.")
        self.blocks[i] = self._empty.pop(i)                    # the compressed block is freed

    def head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        self._fill(head, f"{self.head_name}.")
        return head

    def finish(self, writer, head_compressed: bool) -> None:
        """Write every tensor outside the blocks in its checkpoint dtype: embeddings, final norm, LM head (its
        compressed state, or its dense weight unless it is tied to the embeddings)."""
        if writer is None:
            return
        head = self.model.get_output_embeddings()
        if head_compressed:
            writer.add_module(head, prefix=f"{self.head_name}.")
        blocks = f"{self.path}."
        for name in self._keys(self.model):
            if name.startswith(blocks) or (head_compressed and name.startswith(f"{self.head_name}.")):
                continue
            if self._tied_head(name):
                continue
            writer.add_tensor(name, self.store.load([name])[name])


def _release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``). A block's tensors below glibc's mmap threshold
    (which grows up to 32 MB as large chunks are freed) live on the heap, and glibc keeps what they leave behind:
    without this, resident memory creeps up block after block although nothing is alive."""
    import ctypes
    import ctypes.util

    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):   # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _outside(model: nn.Module, big: set[int]) -> list[nn.Module]:
    """The largest submodules of ``model`` that contain none of the modules in ``big`` (by id) and are not one."""
    out = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if id(child) in big:
                continue
            if any(id(x) in big for x in child.modules()):
                walk(child)
            else:
                out.append(child)

    walk(model)
    return out


def _head_roles(config) -> bool:
    return "lm_head" in getattr(config, "roles", ())


def _refuse_restructuring(recipe: Recipe) -> None:
    for cfg in recipe.passes:
        if build_pass(cfg).restructures:
            raise RecipeError(
                f"{cfg.method} removes heads and channels ranked over the whole model (global gradients or scores), "
                "which the block-by-block pipeline cannot compute; run it whole-model (drop --sequential) on a "
                "machine with the memory `sparsefx compress` estimates for it")


@torch.no_grad()
def compress_blocks(source, recipe: Recipe, calibration: torch.Tensor | None, writer=None,
                    inputs: str = "compressed", progress: bool = True, pairs=None) -> SequentialResult:
    """Run ``recipe`` on ``source`` (``ModelSource`` / ``CheckpointSource``) one decoder block at a time.

    ``calibration``: token ids ``[N, S]`` (this process's share under ``torchrun``). ``writer``
    (``artifact.ArtifactWriter``, checkpoint sources): receives each block's tensors as soon as it is done.
    ``inputs``: ``compressed`` (default) or ``dense`` — what each block is calibrated on (module docstring).

    Example:
        >>> res = compress_blocks(ModelSource(model), recipe, calib)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if inputs not in INPUTS:
        raise RecipeError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    _refuse_restructuring(recipe)
    (manager,) = build_pipeline(recipe)
    manager.check_order()
    head_passes = [p for p in manager.passes if _head_roles(getattr(p, "config", None))]
    head_manager = None
    if head_passes:
        head_manager = _manager(head_passes)
        head_manager.check_order()
    model, blocks, path = source.model, source.blocks, source.path
    model_type = getattr(text_config(model), "model_type", "?")
    bs = recipe.calibration.batch_size
    needs_data = recipe.needs_calibration
    if needs_data and calibration is None:
        raise CalibrationError("this recipe needs calibration data, but none was given; pass "
                               "calibration=data.calibration_batches(tokenizer)")
    ids = calibration if calibration is not None else torch.zeros(1, 16, dtype=torch.long)
    t_start = time.perf_counter()
    source.start()

    # top: embeddings and every block's keyword arguments, per calibration batch
    batches = [ids[i:i + bs] for i in range(0, ids.shape[0], bs)] if needs_data else []
    hidden = [source.embeddings(b) for b in batches]
    kwargs = [block_kwargs(model, blocks, h) for h in hidden]                 # [batch][block] -> dict
    hidden_size = int(text_config(model).hidden_size)
    # capture example: batch 2 (batch and length must not be 1, or export fixes them) at the calibration length, so
    # that length-dependent arguments (a sliding-window mask exists only past the window) are those of the data
    seqlen = int(ids.shape[1]) if needs_data and ids.shape[1] > 1 else 16
    example_hidden = torch.randn(2, seqlen, hidden_size, dtype=COMPUTE_DTYPE, device=source.device)
    example_kwargs = block_kwargs(model, blocks, example_hidden)
    source.end_embeddings(writer)

    per_pass: list[list[PassReport]] = [[] for _ in manager.passes]
    stats: dict[str, ActStats] = {}
    block_seconds = []
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        layer = source.block(i)
        call, example_tensors = BlockCall.build(path, i, example_kwargs[i])
        data = BlockInputs([(h, call.tensors(kw[i])) for h, kw in zip(hidden, kwargs)]) if hidden else None
        dense_out = [layer(h, **kw[i]) for h, kw in zip(hidden, kwargs)] if inputs == "dense" else None
        gm = capture_stage({call.name: layer}, call, (example_hidden, example_tensors), model_type,
                           source=f"block {call.name}")
        ctx = PassContext(calibration=data, batch_size=bs, progress=False, pairs=pairs)
        gm, reports = manager.run(gm, ctx)
        for k, r in enumerate(reports):
            per_pass[k].append(r)
        for name, s in (gm.meta.get(STATS) or {}).items():
            stats[f"{call.name}:{name}"] = s
        lower_to_eager(gm, model)
        del gm
        if hidden:
            hidden = dense_out if dense_out is not None else [layer(h, **kw[i]) for h, kw in zip(hidden, kwargs)]
        source.end_block(i, writer)
        # the block, its graph and the fx/export objects around them form reference cycles: collect them now, or
        # finished blocks pile up until Python's cyclic collector happens to run (depth-independent memory)
        del layer, data, ctx, dense_out, reports
        gc.collect()
        _release_heap()
        block_seconds.append(round(time.perf_counter() - t0, 3))
        bar.set_postfix(seconds=block_seconds[-1])

    head_done = False
    if head_manager is not None:
        head_reports, head_stats = _compress_head(source, head_manager, hidden, seqlen, model_type, bs, pairs)
        for p, r in zip(head_manager.passes, head_reports):
            if p in manager.passes:
                per_pass[manager.passes.index(p)].append(r)
        stats.update(head_stats)
        head_done = getattr(model.get_output_embeddings(), "kind", None) is not None
    source.finish(writer, head_done)
    info = {"blocks": len(blocks), "inputs": inputs, "block_seconds": block_seconds,
            "seconds": round(time.perf_counter() - t_start, 3), "processes": distributed.world_size()}
    return SequentialResult([merge_reports(rs) for rs in per_pass if rs], stats, info)


def _compress_head(source, manager, hidden: list[torch.Tensor], seqlen: int, model_type: str, batch_size: int,
                   pairs) -> tuple[list[PassReport], dict[str, ActStats]]:
    """The LM head as a stage of its own: its own graph, calibrated on what it receives (the last block's outputs
    through the final norm), compressed by the passes that select ``lm_head``, lowered onto the model."""
    model = source.model
    head = source.head()
    name = next(n for n, m in model.named_modules() if m is head)
    xs = [head_inputs(model, source.blocks, h) for h in hidden]
    example = torch.randn(2, seqlen, head.in_features, dtype=COMPUTE_DTYPE, device=source.device)
    gm = capture_stage({name: head}, lambda tree, x: tree.get_submodule(name)(x), (example,), model_type,
                       source="head")
    data = BlockInputs([(x,) for x in xs]) if xs else None
    gm, reports = manager.run(gm, PassContext(calibration=data, batch_size=batch_size, progress=False, pairs=pairs))
    lower_to_eager(gm, model)
    return reports, {f"{name}:{k}": v for k, v in (gm.meta.get(STATS) or {}).items()}


def compress_checkpoint(folder, recipe: Recipe, output, calibration: torch.Tensor | None = None, tokenizer=None,
                        device=None, inputs: str = "compressed", max_shard_size: int | None = None,
                        overwrite: bool = False, progress: bool = True, pairs=None) -> SequentialResult:
    """Compress the HF checkpoint in ``folder`` block by block, streaming its safetensors, and write the artifact
    to ``output`` as it goes (atomically: the folder appears complete or not at all). Dense tensors keep their
    checkpoint dtype. Under ``torchrun`` every process calibrates on its share and rank 0 writes.

    Example:
        >>> compress_checkpoint("ckpt/llama-7b", resolve_recipe("wanda-50"), "out/w50", calib, tok)  # doctest: +SKIP
    """
    from pathlib import Path

    source = CheckpointSource(folder, device)
    generation = None
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if not distributed.is_main():
        result = compress_blocks(source, recipe, calibration, None, inputs, False, pairs)
        distributed.barrier()
        return result
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        writer = ArtifactWriter(tmp, checkpoint_dtypes(folder), max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        result = compress_blocks(source, recipe, calibration, writer, inputs, progress, pairs)
        writer.stats = result.stats
        writer.finish(source.config, tokenizer, recipe, result.report_dict(), generation_config=generation)
    distributed.barrier()
    return result
