"""The C++ kernels are built from the .cpp files under a name keyed by their content (no hand-bumped versions)."""

from __future__ import annotations

import pytest

from sparsefx.ops.build import extension_name, load_extension
from sparsefx.ops.quant import cpu as quant_cpu
from sparsefx.ops.routed import cpu as routed_cpu


def test_the_name_follows_the_source_and_the_defines(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    first = extension_name("k", src)
    assert first.startswith("sparsefx_k_") and extension_name("k", src) == first
    assert extension_name("k", src, {"SPARSEFX_MAX_ROWS": 8}) != first
    src.write_text("int f() { return 2; }\n")                          # an edit: a new build
    assert extension_name("k", src) != first


def test_a_missing_source_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing from this installation .*reinstall sparsefx"):
        load_extension("k", tmp_path / "absent.cpp", "test kernels")


def test_the_families_build_their_own_cpp_files():
    assert routed_cpu.SOURCE.name == "routed.cpp" and routed_cpu.SOURCE.is_file()
    assert quant_cpu.SOURCE.name == "quant.cpp" and quant_cpu.SOURCE.is_file()
    expected = {routed_cpu.extension(): extension_name("routed", routed_cpu.SOURCE),
                quant_cpu.extension(): extension_name("quant", quant_cpu.SOURCE,
                                                      {"SPARSEFX_MAX_ROWS": quant_cpu.MAX_ROWS})}
    for ext, name in expected.items():
        if ext is not None:                                           # built here (AVX2): named by the source's hash
            assert ext.__name__ == name


def test_a_build_that_fails_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    from sparsefx.ops import build

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "load_extension", broken)
    monkeypatch.setattr(build, "cpu_supports_kernels", lambda: True)
    with caplog.at_level(logging.WARNING, logger="sparsefx.ops.build"):
        assert build.try_load_extension("k", tmp_path / "k.cpp", "the test kernels") is None
    assert "the test kernels unavailable (no compiler); using the pure-torch fallback" in caplog.text
    monkeypatch.setattr(build, "cpu_supports_kernels", lambda: False)     # no AVX2: not even tried
    monkeypatch.setattr(build, "load_extension", lambda *a, **k: pytest.fail("built on a CPU without AVX2"))
    assert build.try_load_extension("k", tmp_path / "k.cpp", "the test kernels") is None
