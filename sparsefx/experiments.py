"""Sweeps that compress a model with several recipes and evaluate each under one protocol, in one run, and the
table that shows them. Used by ``sparsefx demo`` and by the sweeps in ``bench/`` (whose timing and results-file
helpers live in ``bench/harness.py``).
"""

from __future__ import annotations

import dataclasses
import time


from .data import PROTOCOL, Protocol, eval_windows, recipe_calibration
from .eval import evaluate
from .models import load_model
from .passes.config import Recipe
from .pipeline import compress


def sweep(model_name: str, recipes: list[Recipe], protocol: Protocol = PROTOCOL, speed: bool = True,
          progress: bool = True, calib_samples: int | None = None, on_row=None) -> list[dict]:
    """Evaluate the dense model, then each recipe on a fresh copy; one row per variant.

    ``calib_samples`` overrides the recipes' calibration sample count (for quick runs); ``on_row(rows)`` is called
    after each row (to save partial results of long sweeps).

    Example:
        >>> rows = sweep("smollm2", [resolve_recipe("wanda-50")])  # doctest: +SKIP
    """
    model, tok = load_model(model_name)
    windows = eval_windows(tok, protocol)
    dense = evaluate(model, tok, protocol, speed=speed, progress=progress, windows=windows)
    rows = [_row("dense", dense, dense, 0.0, None)]
    if on_row:
        on_row(rows)
    del model
    calib_cache: dict = {}
    for recipe in recipes:
        cal = recipe.calibration
        if calib_samples is not None:
            cal = dataclasses.replace(cal, samples=calib_samples)
            recipe = dataclasses.replace(recipe, calibration=cal)
        calibration = None
        if recipe.needs_calibration:
            key = (cal.text, cal.samples, cal.seqlen)
            if key not in calib_cache:
                calib_cache[key] = recipe_calibration(tok, recipe, protocol)
            calibration = calib_cache[key]
        model, _ = load_model(model_name)
        t0 = time.perf_counter()
        result = compress(model, recipe, calibration=calibration, progress=progress)
        seconds = time.perf_counter() - t0
        res = evaluate(model, tok, protocol, speed=speed, progress=progress, windows=windows)
        # activation-sparsity passes report the fraction of linear multiply-adds skipped per token; quantizing
        # passes the stored bits per weight of the linears they rewrote; DAM which order each linear took
        rows.append(_row(recipe.name or recipe.passes[0].method, res, dense, seconds,
                         result.reported("effective_sparsity"), result.reported("bits_per_weight")))
        orders = result.reported("orders")
        if orders:
            rows[-1]["dam_orders"] = " ".join(f"{k}:{v}" for k, v in sorted(orders.items()))
        if on_row:
            on_row(rows)
        del model
    return rows


def _row(name, res, dense, compress_s, effective, bits_per_weight=None) -> dict:
    return {
        "variant": name,
        "ppl": round(res.ppl, 4),
        "ppl_vs_dense": round(res.ppl / dense.ppl, 4),
        "linear_sparsity": round(res.linear_sparsity, 4),
        "effective_sparsity": None if effective is None else round(effective, 4),
        "bits_per_weight": None if bits_per_weight is None else round(bits_per_weight, 4),
        "params_nonzero": res.params_nonzero,
        "decode_tok_s": round(res.decode_tok_s, 2) if res.decode_tok_s else None,
        "decode_vs_dense": round(res.decode_tok_s / dense.decode_tok_s, 3) if res.decode_tok_s else None,
        "eval_tokens": res.tokens,
        "compress_s": round(compress_s, 1),
    }


# How print_table heads the sweep rows' columns (the JSON keeps the keys); a column empty in every row is left out.
_SHOWN = {"variant": "variant", "ppl": "ppl", "ppl_vs_dense": "ppl ×dense", "linear_sparsity": "sparsity",
          "effective_sparsity": "effective", "bits_per_weight": "bits/weight", "params_nonzero": "non-zero",
          "decode_tok_s": "tok/s", "decode_vs_dense": "tok/s ×dense", "compress_s": "compress s"}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.2f}" if abs(v) >= 10 else f"{v:.3f}"


def print_table(rows: list[dict], title: str = "") -> None:
    """Print sweep rows as a table (rich) that fits a normal terminal: short headers, no empty columns, numbers
    rounded for reading (the JSON keeps them whole). Piped (no terminal, no ``COLUMNS``), the table keeps its natural
    width instead of rich's default 80 columns, so no cell is cut."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    cols = [c for c in _SHOWN if any(r.get(c) is not None for r in rows)]
    table = Table(title=title or None)
    for col in cols:
        table.add_column(_SHOWN[col], justify="left" if col == "variant" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    Console(width=200 if piped else None).print(table)
