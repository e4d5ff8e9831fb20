"""bench/kernel_triton.py only runs where a GPU is lent: its --smoke mode (one tiny shape, Triton's CPU interpreter)
keeps the script from rotting between those sessions."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_bench_runs_every_variant_in_smoke_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_triton.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "kernel_triton_cpu_interpret.csv")))
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"dense", "tiered_gemv", "quant_matmul", "dam_fused", "nm_matmul", "banded_gemv",
                       "multitier_gemv"}
    # every variant was timed (a positive time) against the dense row of the same shape
    assert all(float(r["us"]) > 0 and float(r["dense_us"]) > 0 for r in rows)
    assert any("blocked" in r["variant"] for r in rows) and any("gemv" in r["variant"] for r in rows)
