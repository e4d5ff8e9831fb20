"""The banded storage format: all of DAWS's nested medium tiers in one fp16 matrix.

With ``daws.medium_tiers`` each medium tier k keeps the weights with ``|W| >= cut_k`` (cuts rising), so the tiers
nest and one number per weight says which tiers keep it: its *band* ``b = #{k : |W| >= cut_k}`` (0: only the full
weights, 1..K: kept by mediums 1..b). The banded matrix stores each weight as an fp16 number whose two lowest
mantissa bits *are* its band:

    banded: fp16 [out, in]     value = the fp16 number itself, band = bits & 3

A channel routed to tier k (0: full, k >= 1: medium k) multiplies the weights with ``band >= k``. A kernel streams
one fp16 matrix for every tier (one copy in memory instead of fp32 weights plus one copy per medium tier) and
masks each row by comparing two bits; no separate band plane is read.

The price is precision: with two mantissa bits fixed, the values a weight may take are 4 fp16 ulps apart, so the
stored value is within 2 ulps (2^-9 relative, about bf16's precision) of the weight. ``pack_bands`` picks, among
the fp16 numbers that carry the weight's band, the nearest one. Zeros stay exact zeros (band 0: a zero weight
contributes nothing to any tier).
"""

from __future__ import annotations

import torch

MAX_MEDIUMS = 3         # two band bits: bands 0..3
FP16_MAX = 65504.0


@torch.no_grad()
def pack_bands(w: torch.Tensor, cuts) -> torch.Tensor:
    """``W: [out, in]`` and the medium tiers' rising |W| cuts -> the banded fp16 matrix (module docstring).

    Example:
        >>> b = pack_bands(torch.tensor([[0.5, -2.0, 0.0, 1.0]]), [0.75, 1.5])
        >>> band_of(b).tolist(), b.float().tolist()
        ([[0, 2, 0, 1]], [[0.5, -1.998046875, 0.0, 1.0009765625]])
    """
    cuts = [float(c) for c in cuts]
    if not 1 <= len(cuts) <= MAX_MEDIUMS or any(a > b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"pack_bands: expected 1 to {MAX_MEDIUMS} rising cuts, got {cuts}")
    w = w.detach().float()
    a = w.abs()
    largest = float(a.max()) if a.numel() else 0.0
    if not largest <= FP16_MAX:   # also catches inf and nan
        raise ValueError(f"pack_bands: the banded layout stores fp16, but the weight has values beyond fp16's range "
                         f"(max |w| {largest:.4g} > {FP16_MAX}); use daws.layout: separate")
    band = sum((a >= c).to(torch.int32) for c in cuts)
    band = torch.where(a == 0, 0, band)
    # Candidates: the fp16 magnitudes with low bits == band around the nearest fp16 magnitude (as int, monotone).
    h = a.half().view(torch.int16).to(torch.int32)
    base = (h & ~3) | band
    best = base
    best_err = (_magnitude(base) - a).abs()
    for step in (-4, 4):
        cand = base + step
        ok = (cand >= 0) & (cand <= 0x7BFF)       # non-negative, finite
        err = (_magnitude(cand.clamp(0, 0x7BFF)) - a).abs()
        better = ok & (err < best_err)
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    bits = torch.where(w < 0, best | 0x8000, best)   # sign bit (int32 holds 0..0xFFFF)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(torch.float16).contiguous()


def _magnitude(bits: torch.Tensor) -> torch.Tensor:
    """fp32 value of non-negative fp16 bit patterns held as int32."""
    return bits.to(torch.int16).view(torch.float16).float()


def band_of(banded: torch.Tensor) -> torch.Tensor:
    """The band of each weight of a banded matrix (int16, 0..3).

    Example:
        >>> band_of(pack_bands(torch.tensor([1.0, 3.0]), [2.0])).tolist()
        [0, 1]
    """
    check_banded(banded)
    return banded.view(torch.int16) & 3


def tier_weight(banded: torch.Tensor, tier: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights tier ``tier`` multiplies (0: all of them; k: those with band >= k), as ``dtype``.

    Example:
        >>> tier_weight(pack_bands(torch.tensor([1.0, 3.0]), [2.0]), 1).tolist()
        [0.0, 3.001953125]
    """
    values = banded.to(dtype)
    return values if tier == 0 else torch.where(band_of(banded) >= tier, values, 0.0).to(dtype)


def check_banded(banded: torch.Tensor) -> None:
    if banded.dtype != torch.float16:
        raise ValueError(f"a banded weight is fp16 with its band in the low mantissa bits, got {banded.dtype}")


__all__ = ["MAX_MEDIUMS", "band_of", "check_banded", "pack_bands", "tier_weight"]
