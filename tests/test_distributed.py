"""``torchrun --nproc-per-node 2 -m sparsefx compress``: two gloo processes on CPU, each calibrating on half of the
samples, write the artifact one process writes alone (same masks, codes and removal order)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparsefx.shards import TensorStore

RECIPES = {
    # sequential: Wanda masks on attention, GPTQ codes on the MLP
    "sequential": ("calibration: {samples: 8, seqlen: 32, batch_size: 2}\npasses:\n"
                   "  - {method: wanda, sparsity: 0.5, roles: [q, k, v, o]}\n"
                   "  - {method: gptq, bits: 4, group_size: 32, roles: [gate, up, down]}\n"),
    # whole-model: GISP's gradient scores
    "whole": ("calibration: {samples: 8, seqlen: 32, batch_size: 2}\npasses:\n"
              "  - {method: gisp, sparsity: 0.2, steps: 1}\n"),
}


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tensors(folder):
    out = {}
    for stem in ("model", "compressed"):
        if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
            store = TensorStore(folder, stem)
            out.update(store.load(store.keys()))
    return out


@pytest.mark.parametrize("mode", list(RECIPES))
def test_two_gloo_processes_equal_one(mode, tiny_checkpoint, calib_text, tmp_path):
    ckpt = tiny_checkpoint("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[mode])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["compress", str(ckpt), "-r", str(recipe), "--calib-file", str(calib_text), "--no-progress",
            "--device", "cpu"] + (["--sequential"] if mode == "sequential" else [])
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "sparsefx", *args, "-o", str(one)], env)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "sparsefx", *args, "-o", str(two)], env)
    assert proc.stdout.count(f"wrote {two}") == 1            # rank 0 alone writes and reports
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            # masks and codes equal; fp32 sums over the two halves differ from one sum only in rounding
            assert torch.equal(a[k] == 0, b[k] == 0), k
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k
    # the statistics cover all 8 x 32 tokens in both runs: each process saw half, the sums were all-reduced
    for folder in (one, two):
        if (folder / "calibration.safetensors").is_file():
            cal = load_file(folder / "calibration.safetensors")
            assert {int(v[0]) for k, v in cal.items() if k.endswith("n_tokens")} == {8 * 32}
    if mode == "whole":
        sa, sb = (json.loads((f / "structure.json").read_text()) for f in (one, two))
        assert sa["applied"] == sb["applied"] > 0
        removed = lambda s: sorted((g, u) for g, u, _ in s["order"][:s["applied"]])   # noqa: E731
        assert removed(sa) == removed(sb)
        torch.testing.assert_close(torch.tensor([x[2] for x in sa["order"]]), torch.tensor([x[2] for x in sb["order"]]),
                                   rtol=1e-4, atol=1e-9)
