"""Autotune cache (store/lookup, corrupt files, atomic writes) and `sparsefx autotune` runs."""

import json
import logging

import pytest
import torch

from sparsefx.artifact import save_artifact
from sparsefx.cli import main
from sparsefx.codegen import autotune
from sparsefx.ops import tuning
from sparsefx.models import tiny_model
from sparsefx.passes.config import Recipe
from sparsefx.pipeline import compress


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tune" / "autotune.json"
    monkeypatch.setenv("SPARSEFX_AUTOTUNE_CACHE", str(path))
    tuning.reload()
    yield path
    tuning.reload()


def test_store_and_lookup_by_device_shape_and_bin(cache):
    cfg = {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4}
    tuning.store([{"kernel": "tiered_gemv", "shape": (576, 1536), "sparsity": 0.52, "config": cfg, "us": 3.0}],
                   "cpu")
    assert tuning.lookup("tiered_gemv", "cpu", (576, 1536), 0.55) == cfg       # same bin (0.5)
    assert tuning.lookup("tiered_gemv", "cpu", (576, 1536), 0.75) is None
    assert tuning.lookup("tiered_gemv", "cpu", (576, 1536)) is None            # no shape-only entry
    assert tuning.lookup("quant_matmul", "cpu", (576, 1536), 0.5) is None
    assert [p.name for p in cache.parent.iterdir()] == ["autotune.json"]          # no temporary files left
    data = json.loads(cache.read_text())
    assert list(data["devices"]) == [tuning.device_name("cpu", "tiered_gemv")]
    # a second store merges
    tuning.store([{"kernel": "tiered_gemv", "shape": (576, 1536), "sparsity": None, "config": cfg, "us": 3.0}], "cpu")
    assert tuning.lookup("tiered_gemv", "cpu", (576, 1536)) == cfg
    assert tuning.lookup("tiered_gemv", "cpu", (576, 1536), 0.5) == cfg


def test_a_corrupt_cache_is_ignored_with_a_warning(cache, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="sparsefx.ops.tuning"):
        assert tuning.lookup("tiered_gemv", "cpu", (8, 8)) is None
    assert "re-run `sparsefx autotune`" in caplog.text
    tuning.store([{"kernel": "k", "shape": (1,), "sparsity": None, "config": {"a": 1}, "us": 1.0}], "cpu")
    assert tuning.lookup("k", "cpu", (1,)) == {"a": 1}                         # rebuilt


def _daws_artifact(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5}]")
    result = compress(model, recipe, calibration=torch.randint(0, 256, (8, 32)), progress=False)
    return save_artifact(tmp_path / "daws", model, None, recipe, result.report_dict())


def test_cli_tunes_the_triton_kernels_and_launchers_read_the_result(tmp_path, cache, capsys):
    pytest.importorskip("triton")
    from sparsefx.ops.routed.triton import gemv_configs, tiered_gemv

    art = _daws_artifact(tmp_path)
    assert main(["autotune", str(art), "--kernels", "triton", "--max-configs", "2", "--reps", "1",
                 "--sparsity", "0.5", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "tiered_gemv" in out and "wrote" in out
    tuning.reload()
    shapes = autotune.model_shapes(tiny_model("llama"))["tiered_gemv"]
    for shape in shapes:
        cfg = tuning.lookup("tiered_gemv", "cpu", shape)
        assert cfg in gemv_configs()[:2]
    # a launcher without an explicit config runs with the stored one and still computes the right thing
    k, n = sorted(shapes)[0]
    x, w = torch.randn(k), torch.randn(n, k)
    torch.testing.assert_close(tiered_gemv(x, w.t(), None, 0.0, 0.0), w @ x, rtol=1e-5, atol=1e-4)


def test_cli_tunes_the_banded_triton_gemv_and_its_launcher_reads_the_result(tmp_path, cache, capsys):
    pytest.importorskip("triton")
    from sparsefx.ops.routed.triton import banded_gemv
    from sparsefx.ops.routed.triton import gemv_configs
    from sparsefx.ops.routed.format import pack_bands
    from sparsefx.ops.routed.op import banded_linear_reference

    model = tiny_model("llama")
    recipe = Recipe.from_yaml("passes: [{method: daws, sparsity: 0.5, medium_tiers: [0.25, 0.5, 0.75], "
                              "layout: banded}]")
    result = compress(model, recipe, calibration=torch.randint(0, 256, (8, 32)), progress=False)
    art = save_artifact(tmp_path / "banded", model, None, recipe, result.report_dict())
    shapes = autotune.model_shapes(model)["banded_gemv"]
    assert shapes == autotune.model_shapes(model)["tiered_gemv"] and len(shapes) == 4
    assert main(["autotune", str(art), "--kernels", "triton", "--max-configs", "2", "--reps", "1",
                 "--cache", str(cache)]) == 0
    assert "banded_gemv" in capsys.readouterr().out
    tuning.reload()
    plain = [c for c in gemv_configs() if not c.get("GATHER")][:2]
    for shape in shapes:
        assert tuning.lookup("banded_gemv", "cpu", shape) in plain
    # the launcher runs with the stored config and still computes the right thing
    k, n = sorted(shapes)[0]
    banded = pack_bands(torch.randn(n, k), [0.5, 1.0, 1.5])
    x, ts = torch.randn(k), [1.5, 0.8, 0.5, 0.2]
    torch.testing.assert_close(banded_gemv(x, banded.t(), ts), banded_linear_reference(x, banded, None, ts),
                               rtol=1e-5, atol=1e-4)


def test_cli_tunes_the_cpu_kernel_and_a_losing_shape_keeps_the_dense_path(tmp_path, cache, capsys):
    from sparsefx.codegen.cpu import prepare_cpu_decode
    from sparsefx.ops.routed.cpu import extension
    from sparsefx.ops.routed.eager import TieredLinear

    if extension() is None:
        pytest.skip("the C++ kernel does not build here")
    art = _daws_artifact(tmp_path)
    assert main(["autotune", str(art), "--kernels", "cpu", "--reps", "3", "--cache", str(cache)]) == 0
    assert "sparse kernel wins from sparsity" in capsys.readouterr().out
    entries = json.loads(cache.read_text())["devices"]["cpu"]["cpu_tiered_gemv"]
    assert all("min_sparsity" in e["config"] for e in entries.values())
    # a shape measured never to win keeps the dense path in decode; one that wins from some sparsity takes the kernel
    # (on these tiny shapes the measurement itself may go either way, so the entries are set here)
    tuning.store([{"kernel": "cpu_tiered_gemv", "shape": shape, "sparsity": None,
                     "config": {"min_sparsity": None if shape == (64, 64) else 0.25}, "us": 1.0}
                    for shape in autotune.model_shapes(tiny_model("llama"))["tiered_gemv"]], "cpu")
    from sparsefx.artifact import load_artifact

    model = load_artifact(art).model
    prepare_cpu_decode(model)
    kinds = {(m.in_features, m.out_features): m.decode_kernel is not None for m in model.modules()
             if isinstance(m, TieredLinear)}
    assert kinds.pop((64, 64)) is False and all(kinds.values())


def test_cli_refuses_triton_where_it_cannot_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["autotune", "smollm2", "--kernels", "triton", "--device", "cpu",
                 "--cache", str(tmp_path / "c.json")]) == 2
    assert "cannot run on cpu" in capsys.readouterr().err
