"""The routed ops as Triton kernels: ``tiered_linear`` (DAWS; TEAL when the medium tier is empty) below, then
``multitier_linear`` and ``banded_linear`` (their GEMVs share ``launch_routed_gemv``).

Semantics (``sparsefx::tiered_linear``, reference ``tiered_linear_reference`` in ``op.py``), per element of x:

    |x_i| >= t_high          -> x_i * W[:, i]
    t_low <= |x_i| < t_high  -> x_i * W_medium[:, i]
    |x_i| < t_low            -> dropped

Decode (one token) is memory bound: the GEMV kernel reads the weights through ``Wt = W.T`` (``[in, out]``; the
strides are passed, so any layout works, but row-contiguous ``Wt`` — as ``codegen.cpu.prepare_cpu_decode`` stores
it — makes each kept channel one coalesced row) and masks the loads of dropped channels, so their rows are never
fetched. The grid is ``(out blocks, split_k)``: with a small ``out`` the K loop is split between programs, which
add their fp32 partial sums with atomics into an fp32 buffer (never bf16 atomics), cast at the end.

Batch > 1 (prefill, batched decode): every token has its own tiers, so no row can be skipped unless *no* token
keeps it. The GEMM kernel runs over the union of kept channels (gathered indices, computed on the host); when the
union is most of ``in`` the dense path is as fast and is used instead (``dense_above``).
"""

from __future__ import annotations

import torch

from ..triton_support import check_device, k_chunks, output_buffer, splits_for
from ..tuning import lookup
from .format import MAX_MEDIUMS
from .op import banded_linear_math, check_banded_args, check_multitier_args, multitier_linear_math, tiered_linear_math

# Union fraction above which the batch > 1 path multiplies densely (two masked GEMMs) instead of gathering.
DENSE_ABOVE = 0.7


def _kernels():
    from . import _tiered_jit   # lazy: the JIT module imports triton

    return _tiered_jit.gemv, _tiered_jit.gemm


def _gather_kernels():
    from . import _tiered_jit   # lazy: the JIT module imports triton

    return _tiered_jit.compact, _tiered_jit.gemv_gather


def gemv_configs() -> list[dict]:
    """Configs ``sparsefx autotune`` tries for the GEMV: output block, K block, split of the K loop.

    After the first grid come wide, short tiles with the K loop split until each program runs one to a few tiles
    (the shape of TEAL's GEMV: one masked tile per program, rows of 512 B-1 KiB): on an H100 the tuner picked the
    largest split the first grid offers (32) for W 4096 x 11008 (11008 inputs), at the edge of what it could try.
    These have not been timed on a GPU yet."""
    grid = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "GATHER": g}
            for bn in (64, 128) for bk in (64, 128) for sk in (4, 8, 16, 32) for g in (0, 1)]
    wide = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "GATHER": 0}
            for bn in (256, 512) for bk in (16, 32, 64) if bn * bk <= 16384 for sk in (64, 128, 256)]
    return grid + wide


def default_gemv_config(k: int, n: int) -> dict:
    """Heuristic when the autotune cache has no entry: 64 x 128 tiles and the K loop split until there are about
    ``TARGET_PROGRAMS`` programs (a decode GEMV needs many loads in flight to approach the memory bandwidth; the
    tile is what H100 tuning picked for every decode shape, ``bench/results/kernel_triton_*``)."""
    return {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": splits_for(-(-n // 64), k, 128), "num_warps": 4}


def gemm_configs() -> list[dict]:
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
            for bm in (16, 32, 64) for bn in (32, 64, 128) for bk in (32, 64) for w in (4, 8)]


def default_gemm_config(m: int, k: int, n: int) -> dict:
    return {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}


def _config(kernel: str, shape: tuple, default: dict, device: torch.device, config: dict | None) -> dict:
    if config is not None:
        return config

    return lookup(kernel, device, shape) or default


# Threshold slots of the routed GEMVs (``multitier_gemv``, ``banded_gemv`` below): the full tier and up to three
# medium tiers.
ROUTED_THRESHOLDS = 4


def launch_routed_gemv(jit, tuned_as: str, x: torch.Tensor, k: int, n: int, thresholds: list[float], operands: list,
                       strides: list[int], config: dict | None, out: torch.Tensor | None) -> torch.Tensor:
    """Launch a routed GEMV ``jit(x, *operands, y, K, N, t0, t1, t2, t3, *strides, k_chunk, N_T=..., ...)`` over a
    ``(out blocks, K splits)`` grid with the tiered GEMV's tiles (the autotune entry ``tuned_as`` for ``(k, n)``, else
    ``default_gemv_config``); unused threshold slots are padded, ``N_T`` says how many count. Returns ``y: [n]`` in
    x's dtype (fp32 accumulation; ``out``: an fp32 buffer to write)."""
    cfg = _config(tuned_as, (k, n), default_gemv_config(k, n), x.device, config)
    k_chunk, split = k_chunks(k, cfg["BLOCK_K"], cfg["SPLIT_K"])
    y = output_buffer(out, (n,), x.device, zero=split > 1)
    ts = [float(t) for t in thresholds] + [0.0] * (ROUTED_THRESHOLDS - len(thresholds))
    jit[(-(-n // cfg["BLOCK_N"]), split)](x.contiguous(), *operands, y, k, n, *ts, *strides, k_chunk,
                                          N_T=len(thresholds), ATOMIC=split > 1, BLOCK_N=cfg["BLOCK_N"],
                                          BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y.to(x.dtype)


def block_layout(wt: torch.Tensor, block_n: int) -> torch.Tensor:
    """``W.T`` (``[in, out]``) stored by blocks of ``block_n`` outputs: ``[ceil(out / block_n), in, block_n]``
    (zero-padded), so that the rows a GEMV program reads for its output block are contiguous in memory: at 50 %
    activation sparsity it skips every other short segment of one stream instead of gathering segments a full
    row apart. ``tiered_gemv`` takes it in place of ``wt`` (its programs then own ``block_n`` outputs).

    Example:
        >>> block_layout(torch.arange(6.).reshape(2, 3), 2)[1]
        tensor([[2., 0.],
                [5., 0.]])
    """
    k, n = wt.shape
    blocks = -(-n // block_n)
    padded = torch.zeros(k, blocks * block_n, dtype=wt.dtype, device=wt.device)
    padded[:, :n] = wt
    return padded.reshape(k, blocks, block_n).permute(1, 0, 2).contiguous()


def _strides(wt: torch.Tensor, block_n: int) -> tuple[int, int, int]:
    """(s_k, s_n, s_b) of a plain ``[in, out]`` or blocked ``[blocks, in, block_n]`` weight."""
    if wt.dim() == 3:
        return wt.stride(1), wt.stride(2), wt.stride(0)
    return wt.stride(0), wt.stride(1), block_n * wt.stride(1)


def tiered_gemv(x: torch.Tensor, wt: torch.Tensor, wmt: torch.Tensor | None, t_high: float, t_low: float,
                config: dict | None = None, out: torch.Tensor | None = None, n_out: int | None = None) -> torch.Tensor:
    """One token through a tiered linear: ``x: [in]``, ``wt: [in, out]`` (``W.T``, any strides), ``wmt`` the
    medium weights the same way or None (no medium tier) -> ``y: [out]`` in x's dtype (fp32 accumulation).
    ``out``: an fp32 ``[out]`` buffer to write (tests poison it to catch outputs the kernel never writes).
    ``wt`` (and ``wmt``) may be in ``block_layout`` (``[blocks, in, block_n]``, ``n_out`` = the true ``out``); the
    programs then own ``block_n`` outputs whatever the config says.

    Example:
        >>> w = torch.eye(3)
        >>> tiered_gemv(torch.tensor([3., 1., 0.1]), w.t(), None, 2.0, 0.5)  # doctest: +SKIP
        tensor([3., 0., 0.])
    """
    check_device(x, wt)
    blocked = wt.dim() == 3
    k = wt.shape[1] if blocked else wt.shape[0]
    n = (n_out or wt.shape[0] * wt.shape[2]) if blocked else wt.shape[1]
    if x.dim() != 1 or wt.dim() not in (2, 3) or k != x.shape[0]:
        raise ValueError(f"tiered_gemv: x must be [in] and wt [in, out] (or block_layout); got {tuple(x.shape)} and "
                         f"{tuple(wt.shape)}")
    if wmt is not None and wmt.shape != wt.shape:
        raise ValueError(f"tiered_gemv: wmt {tuple(wmt.shape)} must match wt {tuple(wt.shape)}")
    cfg = _config("tiered_gemv", (k, n), default_gemv_config(k, n), x.device, config)
    if blocked:
        cfg = {**cfg, "BLOCK_N": wt.shape[2]}
    has_medium = wmt is not None and t_low < t_high
    wm = wmt if has_medium else wt
    x = x.contiguous()
    strides = (*_strides(wt, cfg["BLOCK_N"]), *_strides(wm, cfg["BLOCK_N"]))
    if cfg.get("GATHER") and (not has_medium or wm.dtype == wt.dtype):
        return _gather_gemv(x, wt, wm, k, n, strides, has_medium, t_high, t_low, cfg, out)
    gemv, _ = _kernels()
    block_k = cfg["BLOCK_K"]
    k_chunk, split = k_chunks(k, block_k, cfg["SPLIT_K"])
    y = output_buffer(out, (n,), x.device, zero=split > 1)
    grid = (-(-n // cfg["BLOCK_N"]), split)
    gemv[grid](x, wt, wm, y, k, n, float(t_high), float(t_low), *strides, k_chunk, HAS_MEDIUM=has_medium,
               SAME_DTYPE=wm.dtype == wt.dtype, ATOMIC=split > 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
               num_warps=cfg["num_warps"])
    return y.to(x.dtype)


def _gather_gemv(x, wt, wm, k: int, n: int, strides, has_medium: bool, t_high: float, t_low: float, cfg: dict,
                 out) -> torch.Tensor:
    """``GATHER`` configs: one program lists the kept channels on the device (no host sync), then the GEMV's
    programs split that list, so every row a program loads is a kept one."""
    compact, gemv = _gather_kernels()
    idx = torch.empty(k, dtype=torch.int32, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    compact[(1,)](x, idx, count, k, float(t_low if has_medium else t_high), BLOCK=1024, num_warps=4)
    split = max(1, cfg["SPLIT_K"])
    y = output_buffer(out, (n,), x.device, zero=split > 1)
    gemv[(-(-n // cfg["BLOCK_N"]), split)](
        x, idx, count, wt, wm, y, n, float(t_high), *strides, HAS_MEDIUM=has_medium, SPLIT=split, ATOMIC=split > 1,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y.to(x.dtype)


def kept_channels(x: torch.Tensor, t_low: float) -> torch.Tensor:
    """Input channels that some row of ``x: [M, in]`` keeps (``|x| >= t_low``): int32 indices, ascending."""
    return torch.nonzero((x.abs() >= t_low).any(0)).flatten().to(torch.int32)


def tiered_gemm(x: torch.Tensor, wt: torch.Tensor, wmt: torch.Tensor | None, t_high: float, t_low: float,
                idx: torch.Tensor | None = None, config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x: [M, in]`` through a tiered linear, reading only the weight rows of ``idx`` (default: the
    channels some row keeps) -> ``[M, out]`` in x's dtype.

    Example:
        >>> tiered_gemm(torch.randn(5, 64), torch.randn(64, 32), None, 0.5, 0.5).shape  # doctest: +SKIP
        torch.Size([5, 32])
    """
    _, gemm = _kernels()
    check_device(x, wt)
    if x.dim() != 2 or wt.dim() != 2 or wt.shape[0] != x.shape[1]:
        raise ValueError(f"tiered_gemm: x must be [M, in] and wt [in, out]; got {tuple(x.shape)}, {tuple(wt.shape)}")
    m, k = x.shape
    n = wt.shape[1]
    idx = kept_channels(x, t_low) if idx is None else idx.to(device=x.device, dtype=torch.int32).contiguous()
    cfg = _config("tiered_gemm", (m, k, n), default_gemm_config(m, k, n), x.device, config)
    has_medium = wmt is not None and t_low < t_high
    wm = wmt if has_medium else wt
    x = x.contiguous()
    y = output_buffer(out, (m, n), x.device)
    grid = (-(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"]))
    gemm[grid](x, idx, wt, wm, y, m, n, idx.numel(), float(t_high), float(t_low), x.stride(0), wt.stride(0),
               wt.stride(1), wm.stride(0), wm.stride(1), HAS_MEDIUM=has_medium, IEEE=x.dtype == torch.float32,
               BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return y.to(x.dtype)


@torch.library.custom_op("sparsefx::triton_tiered_linear", mutates_args=())
def triton_tiered_linear(x: torch.Tensor, weight: torch.Tensor, weight_medium: torch.Tensor,
                         bias: torch.Tensor | None, t_high: float, t_low: float) -> torch.Tensor:
    """``sparsefx::tiered_linear`` through the Triton kernels (same signature; what the backend lowers it to).

    One token -> GEMV; more rows -> GEMM over the union of kept channels, or the dense path when the union is
    over ``DENSE_ABOVE`` of the inputs.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                   # [M, in]
    wmt = weight_medium.t()                                         # read only when t_low < t_high
    if x2.shape[0] == 1:
        y = tiered_gemv(x2[0], weight.t(), wmt, t_high, t_low)[None]
    else:
        idx = kept_channels(x2, t_low)
        if idx.numel() > DENSE_ABOVE * shape[-1]:
            return tiered_linear_math(x, weight, weight_medium, bias, t_high, t_low)
        y = tiered_gemm(x2, weight.t(), wmt, t_high, t_low, idx=idx)
    y = y.reshape(*shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@triton_tiered_linear.register_fake
def _(x, weight, weight_medium, bias, t_high, t_low):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))



# ---------------------------------------------------------------- multitier_linear (mediums stored apart)

assert MAX_MEDIUMS == ROUTED_THRESHOLDS - 1        # the GEMVs' threshold slots hold every tier of the format


def multitier_gemv(x: torch.Tensor, wt: torch.Tensor, wmts: list[torch.Tensor], thresholds: list[float],
                   config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token through ``multitier_linear``: ``x: [in]``, ``wt`` and each of ``wmts`` ``[in, out]`` (transposed,
    any strides), one threshold more than mediums (descending) -> ``y: [out]`` in x's dtype (fp32 accumulation).

    Example:
        >>> wt = torch.randn(64, 32); wmts = [wt * (wt.abs() > 0.5), wt * (wt.abs() > 1.0)]
        >>> y = multitier_gemv(torch.randn(64), wt, wmts, [1.5, 0.7, 0.3])  # doctest: +SKIP
    """
    from . import _multitier_jit   # lazy: the JIT module imports triton

    check_device(x, wt, *wmts)
    if x.dim() != 1 or wt.dim() != 2 or wt.shape[0] != x.shape[0] or any(w.shape != wt.shape for w in wmts):
        raise ValueError(f"multitier_gemv: x must be [in] and wt and every medium [in, out]; got {tuple(x.shape)}, "
                         f"{tuple(wt.shape)} and {[tuple(w.shape) for w in wmts]}")
    if not 1 <= len(wmts) <= MAX_MEDIUMS or len(thresholds) != len(wmts) + 1:
        raise ValueError(f"multitier_gemv: 1 to {MAX_MEDIUMS} mediums and one threshold more; got {len(wmts)} "
                         f"mediums and {len(thresholds)} thresholds")
    k, n = wt.shape
    mats = [wt, *wmts] + [wmts[0]] * (MAX_MEDIUMS - len(wmts))        # unused slots: never loaded
    strides = [s for m in mats for s in (m.stride(0), m.stride(1))]
    return launch_routed_gemv(_multitier_jit.gemv, "tiered_gemv", x, k, n, thresholds, mats, strides, config, out)


@torch.library.custom_op("sparsefx::triton_multitier_linear", mutates_args=())
def triton_multitier_linear(x: torch.Tensor, weight: torch.Tensor, mediums: list[torch.Tensor],
                            bias: torch.Tensor | None, thresholds: list[float]) -> torch.Tensor:
    """``sparsefx::multitier_linear`` through the Triton kernel (same signature; what the backend lowers it to): one
    token with at most three mediums -> ``multitier_gemv``; anything else -> the op's default math."""
    check_multitier_args(x, weight, mediums, thresholds)
    if x.numel() != x.shape[-1] or len(mediums) > MAX_MEDIUMS:
        return multitier_linear_math(x, weight, mediums, bias, thresholds)
    y = multitier_gemv(x.reshape(-1), weight.t(), [m.t() for m in mediums], thresholds)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@triton_multitier_linear.register_fake
def _(x, weight, mediums, bias, thresholds):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------- banded_linear (every tier in one fp16 matrix)

def banded_gemv(x: torch.Tensor, wt: torch.Tensor, thresholds: list[float], config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One token through ``banded_linear``: ``x: [in]``, ``wt: [in, out]`` (the banded fp16 matrix transposed, any
    strides), 2 to 4 descending thresholds -> ``y: [out]`` in x's dtype (fp32 accumulation). ``out``: an fp32
    ``[out]`` buffer to write (tests poison it).

    Example:
        >>> from sparsefx.ops.routed.format import pack_bands
        >>> wt = pack_bands(torch.randn(32, 64), [0.5, 1.0]).t()
        >>> y = banded_gemv(torch.randn(64), wt, [1.5, 0.7, 0.3])  # doctest: +SKIP
    """
    from . import _banded_jit   # lazy: the JIT module imports triton

    check_device(x, wt)
    if x.dim() != 1 or wt.dim() != 2 or wt.shape[0] != x.shape[0] or wt.dtype != torch.float16:
        raise ValueError(f"banded_gemv: x must be [in] and wt fp16 [in, out]; got {tuple(x.shape)} and {wt.dtype} "
                         f"{tuple(wt.shape)}")
    if not 2 <= len(thresholds) <= MAX_MEDIUMS + 1:
        raise ValueError(f"banded_gemv: expected 2 to {MAX_MEDIUMS + 1} thresholds, got {len(thresholds)}")
    k, n = wt.shape
    return launch_routed_gemv(_banded_jit.gemv, "banded_gemv", x, k, n, thresholds, [wt],
                              [wt.stride(0), wt.stride(1)], config, out)


@torch.library.custom_op("sparsefx::triton_banded_linear", mutates_args=())
def triton_banded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         thresholds: list[float]) -> torch.Tensor:
    """``sparsefx::banded_linear`` through the Triton kernel (same signature; what the backend lowers it to): one
    token -> ``banded_gemv``; more rows -> the op's default math."""
    check_banded_args(x, weight, thresholds)
    if x.numel() != x.shape[-1]:
        return banded_linear_math(x, weight, bias, thresholds)
    y = banded_gemv(x.reshape(-1), weight.t(), thresholds).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@triton_banded_linear.register_fake
def _(x, weight, bias, thresholds):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


__all__ = ["DENSE_ABOVE", "MAX_MEDIUMS", "ROUTED_THRESHOLDS", "banded_gemv", "block_layout", "default_gemm_config",
           "default_gemv_config", "gemm_configs", "gemv_configs", "kept_channels", "launch_routed_gemv",
           "multitier_gemv", "tiered_gemm", "tiered_gemv", "triton_banded_linear",
           "triton_multitier_linear", "triton_tiered_linear"]
