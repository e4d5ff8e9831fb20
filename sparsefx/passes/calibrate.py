"""Calibration as a compiler step: prepare (insert observers at linear inputs) -> run batches -> statistics.

One observer per distinct linear input (q/k/v share one, gate/up share one). Statistics are attached to the IR:
``node.meta['sparsefx.stats']`` on each linear (the shared ``ActStats`` object of its input) and
``gm.meta['sparsefx.stats']`` keyed by input node name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from .. import distributed
from ..errors import CalibrationError
from ..ir.annotate import annotated_linears
from ..ir.meta import STATS
from .base import Pass, PassContext, PassReport, PassResult

_OBS_PREFIX = "_sparsefx_observer_"
# |x| histogram: log10-spaced bins over [1e-8, 1e4]; below goes into bin 0, above into the last bin.
HIST_BINS, HIST_LO, HIST_HI = 2048, -8.0, 4.0


@dataclass
class ActStats:
    """Statistics of one linear input ``x: [..., C]`` over all calibration tokens."""

    n_tokens: int
    sq_sum: torch.Tensor     # [C] float64, sum of x_c^2
    abs_sum: torch.Tensor    # [C] float64, sum of |x_c|
    abs_max: torch.Tensor    # [C] float32
    hist: torch.Tensor       # [HIST_BINS] float64, counts of log10|x| over all channels

    @property
    def channel_l2(self) -> torch.Tensor:
        """``||X_c||_2`` over calibration tokens (Wanda's activation norm), float32 ``[C]``."""
        return self.sq_sum.sqrt().float()

    @property
    def channel_mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def quantile(self, q: float) -> float:
        """Approximate quantile of |x| (all channels) from the histogram, exact to one log-bin (~1.4%)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cdf = self.hist.cumsum(0) / self.hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=HIST_BINS - 1))
        width = (HIST_HI - HIST_LO) / HIST_BINS
        return 10 ** (HIST_LO + (idx + 1) * width)

    def fraction_below(self, t: float) -> float:
        """Approximate fraction of |x| values (all channels) below ``t``, from the histogram."""
        if t <= 0:
            return 0.0
        width = (HIST_HI - HIST_LO) / HIST_BINS
        edge = int(round((math.log10(t) - HIST_LO) / width))  # bins [0, edge) lie below t
        edge = min(max(edge, 0), HIST_BINS)
        return float(self.hist[:edge].sum() / self.hist.sum())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.sq_sum": self.sq_sum, f"{prefix}.abs_sum": self.abs_sum, f"{prefix}.abs_max": self.abs_max,
                f"{prefix}.hist": self.hist, f"{prefix}.n_tokens": torch.tensor([self.n_tokens])}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "ActStats":
        return cls(int(t[f"{prefix}.n_tokens"][0]), t[f"{prefix}.sq_sum"], t[f"{prefix}.abs_sum"],
                   t[f"{prefix}.abs_max"], t[f"{prefix}.hist"])


class Observer(nn.Module):
    """Identity module that accumulates ``ActStats`` of what flows through it."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.n_tokens = 0
        self.sq_sum = torch.zeros(channels, dtype=torch.float64)
        self.abs_sum = torch.zeros(channels, dtype=torch.float64)
        self.abs_max = torch.zeros(channels)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., C]
        flat = x.detach().reshape(-1, self.channels).float()
        a = flat.abs()
        self.n_tokens += flat.shape[0]
        self.sq_sum += flat.double().pow(2).sum(0).cpu()
        self.abs_sum += a.double().sum(0).cpu()
        self.abs_max = torch.maximum(self.abs_max, a.amax(0).cpu())
        logs = a.clamp_min(10 ** HIST_LO).log10().clamp(HIST_LO, HIST_HI)
        self.hist += torch.histc(logs, HIST_BINS, HIST_LO, HIST_HI).double().cpu()
        return x

    def stats(self) -> ActStats:
        return ActStats(self.n_tokens, self.sq_sum.clone(), self.abs_sum.clone(), self.abs_max.clone(), self.hist.clone())

    def all_reduce_(self) -> None:
        """Sum (max for ``abs_max``) the statistics over every process of a ``torchrun`` calibration."""
        n = torch.tensor([self.n_tokens], dtype=torch.float64)
        distributed.all_reduce_([self.sq_sum, self.abs_sum, self.hist, n])
        distributed.all_reduce_([self.abs_max], op="max")
        self.n_tokens = int(n.item())


def insert_observers(gm: GraphModule, sources: list[torch.fx.Node] | None = None,
                     factory=None) -> dict[str, str]:
    """Insert an observer after each node of ``sources`` (default: every distinct linear input) and rewire its
    consumers through it; return ``{source node name: observer module name}``. ``factory(channels)`` builds the
    observer (default ``Observer``; anything with ``stats()`` works)."""
    factory = factory or Observer
    if sources is None:
        by_name = {n.name: n for n in gm.graph.nodes}
        sources = list({info.input_node: by_name[info.input_node] for _, info in annotated_linears(gm)}.values())
    inserted: dict[str, str] = {}
    for src in sources:
        if src.name in inserted:
            continue
        mod_name = f"{_OBS_PREFIX}{len(inserted)}"
        gm.add_submodule(mod_name, factory(int(src.meta["val"].shape[-1])))
        with gm.graph.inserting_after(src):
            obs = gm.graph.call_module(mod_name, (src,))
        obs.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta")})
        src.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
        inserted[src.name] = mod_name
    gm.recompile()
    return inserted


def observe(gm: GraphModule, sources: list[torch.fx.Node], ctx: PassContext) -> dict[str, ActStats]:
    """Statistics of the outputs of ``sources`` on ``ctx.calibration``; the graph is left as it was.

    For passes that need statistics of values other than linear inputs (e.g. an MLP's activation output).

    Example:
        >>> stats = observe(gm, [act_node], ctx)  # doctest: +SKIP
    """
    if ctx.calibration is None:
        raise CalibrationError("this pass needs calibration data, but none was given; "
                               "pass calibration=data.calibration_batches(tokenizer)")
    inserted = insert_observers(gm, sources)
    try:
        run_calibration(gm, ctx.calibration, ctx.batch_size, ctx.progress)
    finally:
        stats = remove_observers(gm, inserted)
    _check_finite(stats)
    return stats


class BlockInputs:
    """Calibration data of a graph captured from one decoder block (``ir.capture_block``) or the LM head: per
    batch, the graph's positional inputs — ``hidden: [B, S, D]`` first, then the block's other tensor inputs
    (position embeddings, masks). The sequential pipeline computes them block by block; a pass sees them where it
    would see token ids (``ctx.calibration``), with the same ``shape`` ``[N, S]`` and prefix slicing
    ``[:n]`` (whole samples)."""

    def __init__(self, batches: list[tuple]):
        if not batches:
            raise CalibrationError("a block needs at least one calibration batch")
        self.batches = list(batches)

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(int(b[0].shape[0]) for b in self.batches), int(self.batches[0][0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> "BlockInputs":
        if not isinstance(key, slice) or key.start not in (None, 0) or key.step not in (None, 1):
            raise TypeError("BlockInputs supports prefixes only: inputs[:n]")
        left = self.shape[0] if key.stop is None else max(int(key.stop), 1)
        out = []
        for args in self.batches:
            b = int(args[0].shape[0])
            if left <= 0:
                break
            out.append(args if b <= left else _first_samples(args, b, left))
            left -= b
        return BlockInputs(out)


def _first_samples(args: tuple, batch: int, n: int) -> tuple:
    """The first ``n`` samples of one batch of block inputs: every tensor whose first dimension is the batch is
    cut; broadcast ones (``cos``/``sin`` of shape ``[1, S, d]``) are kept."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t, args)


def calibration_args(calibration, batch_size: int):
    """The positional inputs of each calibration batch: ``(ids[i:i+batch_size],)`` for token ids ``[N, S]``, the
    recorded batches of a ``BlockInputs``."""
    if isinstance(calibration, BlockInputs):
        yield from calibration.batches
        return
    for i in range(0, calibration.shape[0], batch_size):
        yield (calibration[i:i + batch_size],)


def _to_device(args: tuple, device: torch.device) -> tuple:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t, args)


def _check_batches(batches) -> None:
    if isinstance(batches, BlockInputs):
        return
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.dtype != torch.long \
            or batches.numel() == 0:
        got = f"{tuple(batches.shape)} {batches.dtype}" if isinstance(batches, torch.Tensor) else type(batches).__name__
        raise CalibrationError(f"calibration data must be non-empty token ids [N, S] of dtype long, got {got}; "
                               "use data.calibration_batches(tokenizer)")


def run_calibration(gm: GraphModule, batches, batch_size: int = 4, progress: bool = True) -> None:
    """Feed calibration data through ``gm`` — token ids ``[N, S]`` in chunks of ``batch_size``, or a block's
    ``BlockInputs`` — with a progress bar; then all-reduce the observers' statistics over the processes of a
    ``torchrun`` calibration (``sparsefx.distributed``)."""
    from tqdm.auto import tqdm

    _check_batches(batches)
    device = next(iter(gm.parameters())).device
    steps = len(batches.batches) if isinstance(batches, BlockInputs) else math.ceil(batches.shape[0] / batch_size)
    with torch.no_grad():
        for args in tqdm(calibration_args(batches, batch_size), total=steps, desc="calibrating", unit="batch",
                         disable=not progress):
            gm(*_to_device(args, device))
    distributed.reduce_observers(gm)


def remove_observers(gm: GraphModule, inserted: dict[str, str]) -> dict:
    """Take the observers out of the graph (restoring it exactly); return their ``stats()`` by input node name."""
    stats = {}
    for src_name, mod_name in inserted.items():
        obs_node = next(iter(gm.graph.find_nodes(op="call_module", target=mod_name)))
        stats[src_name] = gm.get_submodule(mod_name).stats()
        obs_node.replace_all_uses_with(obs_node.args[0])
        gm.graph.erase_node(obs_node)
        gm.delete_submodule(mod_name)
    gm.recompile()
    return stats


def _check_finite(stats: dict[str, ActStats]) -> None:
    for name, s in stats.items():
        if s.n_tokens == 0:
            raise CalibrationError(f"no calibration tokens reached {name}; run_calibration saw no batches")
    bad = [name for name, s in stats.items()
           if not (torch.isfinite(s.sq_sum).all() and torch.isfinite(s.abs_max).all())]
    if bad:
        raise CalibrationError(f"non-finite activation statistics (NaN/inf) at {bad[:5]}"
                               f"{' ...' if len(bad) > 5 else ''}; the model overflows on the calibration text — "
                               "run it in float32 and check the weights for NaN")


def collect_statistics(gm: GraphModule, inserted: dict[str, str]) -> dict[str, ActStats]:
    """Remove the observers, check and attach their statistics to the IR, and return them by input node name."""
    stats = remove_observers(gm, inserted)
    # Name the linears (not the anonymous input nodes) in errors.
    _check_finite({info.param: stats[info.input_node] for _, info in annotated_linears(gm) if info.input_node in stats})
    for lin, info in annotated_linears(gm):
        if info.input_node in stats:
            lin.meta[STATS] = stats[info.input_node]
    gm.meta[STATS] = stats
    return stats


class CalibratePass(Pass):
    """Observe linear inputs on ``ctx.calibration`` and attach ``ActStats`` to every linear node."""

    name = "calibrate"
    requires = ("annotated",)
    provides = ("calibrated",)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise CalibrationError("a pass in this recipe needs calibration data, but none was given; "
                                   "pass calibration=data.calibration_batches(tokenizer)")
        _check_batches(ctx.calibration)
        inserted = insert_observers(gm)
        try:
            run_calibration(gm, ctx.calibration, ctx.batch_size, ctx.progress)
        except BaseException:
            remove_observers(gm, inserted)  # leave the graph as it was
            raise
        stats = collect_statistics(gm, inserted)
        n_tok = next(iter(stats.values())).n_tokens if stats else 0
        return PassResult(gm, False, PassReport(self.name, matches=len(stats),
                                                details={"observed_inputs": len(stats), "tokens": n_tok}))
