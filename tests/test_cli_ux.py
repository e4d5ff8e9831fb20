"""What a new user meets first: the recipe list, help texts, errors worded for the command line, tables that fit a
terminal, no progress bars in logs."""

import os
import re
import sys

import pytest

from sparsefx import cli
from sparsefx.cli import main
from sparsefx.passes.config import builtin_recipes


def test_recipes_are_listed_by_method_with_their_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    groups = re.findall(r"^(\S[^:\n]*):$", out, flags=re.MULTILINE)
    assert {"wanda", "daws", "gptq", "rtn", "dam", "gisp", "magnitude"} <= set(groups)
    assert groups == sorted(groups)
    for name in builtin_recipes():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert len(line.split()) > 2, line                  # a description follows the name
    assert re.search(r"^\s+wanda-50\s+\*\s+50 % unstructured", out, flags=re.MULTILINE)      # * = calibrates
    assert re.search(r"^\s+magnitude-50\s{2,}[^*\s]", out, flags=re.MULTILINE)
    assert max(map(len, out.splitlines()[:-1])) <= 100                                # fits a terminal


def test_every_flag_has_help():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "cmd").choices
    for name, sub in subs.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"sparsefx {name} {action.option_strings[0]} has no help text"


def test_export_refuses_an_existing_output_before_loading(tmp_path, monkeypatch, capsys):
    import sparsefx.artifact

    monkeypatch.setattr(sparsefx.artifact, "load_artifact", lambda *a, **k: pytest.fail("loaded the artifact"))
    (tmp_path / "small").mkdir()
    assert main(["export", str(tmp_path / "art"), "--level", "0.2", "-o", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "already exists; add --overwrite" in err and "overwrite=True" not in err


def test_a_file_exists_error_is_worded_for_the_command_line(tmp_path, monkeypatch, capsys):
    from sparsefx._cache import atomic_dir

    def cmd(args):
        with atomic_dir(tmp_path):          # exists: what save_artifact raises when the folder appears meanwhile
            pass

    monkeypatch.setattr(cli, "cmd_recipes", cmd)
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} already exists; add --overwrite" in err and "overwrite=True" not in err


def test_no_progress_bars_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.append(args.no_progress) or 0)
    assert main(["eval", "smollm2"]) == 0                   # pytest captures stderr: not a TTY
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["eval", "smollm2"]) == 0
    assert seen == [True, False]


def test_piped_output_silences_the_raw_tqdm_bars_of_libraries_too():
    """transformers' GGUF loader draws a plain tqdm bar that its disable_progress_bar() does not reach."""
    import subprocess

    bar = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='converting'): pass\n"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      check=True).stderr
    assert "converting" in run(bar)                          # the bar is drawn on a pipe by default
    assert "converting" not in run("from sparsefx.cli import _silence_progress_bars\n_silence_progress_bars()\n" + bar)


def test_the_sweep_table_fits_a_terminal_and_hides_empty_columns(capsys, monkeypatch):
    from sparsefx.experiments import print_table

    monkeypatch.setenv("COLUMNS", "100")
    rows = [{"variant": "dense", "ppl": 18.5312, "ppl_vs_dense": 1.0, "linear_sparsity": 0.0,
             "effective_sparsity": None, "bits_per_weight": None, "params_nonzero": 134515008,
             "decode_tok_s": 25.31, "decode_vs_dense": 1.0, "eval_tokens": 16368, "compress_s": 0.0},
            {"variant": "wanda-2of4", "ppl": 61.2, "ppl_vs_dense": 3.3026, "linear_sparsity": 0.5,
             "effective_sparsity": None, "bits_per_weight": None, "params_nonzero": 81430000,
             "decode_tok_s": 20.1, "decode_vs_dense": 0.794, "eval_tokens": 16368, "compress_s": 41.2}]
    print_table(rows, "smollm2: wiki ppl")
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    assert "effective" not in out and "bits/weight" not in out       # empty in every row
    assert "134,515,008" in out and "wanda-2of4" in out and "3.303" in out and "18.53" in out


def test_the_sweep_table_piped_cuts_no_cell(capsys, monkeypatch):
    from sparsefx.experiments import print_table

    monkeypatch.delenv("COLUMNS", raising=False)                    # pytest's stdout is not a terminal
    rows = [{"variant": "daws-50-mt3-banded-head8", "ppl": 21.4411, "ppl_vs_dense": 1.1632, "linear_sparsity": 0.0,
             "params_nonzero": 134515008, "decode_tok_s": 25.31, "decode_vs_dense": 1.0, "compress_s": 73.2}]
    print_table(rows)
    out = capsys.readouterr().out
    assert "daws-50-mt3-banded-head8" in out and "…" not in out and "compress s" in out


def test_token_by_token_scoring_raises_no_deprecation_warning():
    import warnings

    import torch

    from sparsefx.eval import perplexity
    from sparsefx.models import tiny_model

    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # transformers' FutureWarning for past_key_values would fail here
        decoded = perplexity(model, windows, progress=False, decode=True)[0]
    assert decoded == pytest.approx(perplexity(model, windows, progress=False)[0], rel=1e-5)


def test_eval_says_each_stage_when_there_are_no_bars(tiny_checkpoint, caplog):
    """Piped, `sparsefx eval` draws no bars; a line per stage tells a log reader it is not hung."""
    import logging

    import torch

    folder = tiny_checkpoint(dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="sparsefx.eval"):
        assert main(["eval", str(folder), "--tokens", "256", "--window", "128", "--no-progress"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "sparsefx.eval"]
    assert said[0] == "perplexity: 2 windows of 128 tokens"
    assert said[1].startswith("decode speed: greedy generate(), best of 2 runs of 64 new tokens")


def test_a_slow_kernel_build_says_so_and_a_fast_load_stays_silent(caplog):
    """The first load of the C++ kernels compiles them for minutes with nothing shown; a cached load is silent."""
    import logging
    import time

    from sparsefx.ops.build import announce_if_slow

    with caplog.at_level(logging.INFO, logger="sparsefx.ops.build"):
        with announce_if_slow("the test kernels", after_s=0.05):
            pass                                                       # a cache hit
        time.sleep(0.2)
        assert not caplog.records
        with announce_if_slow("the test kernels", after_s=0.05):
            time.sleep(0.5)                                            # a build
    assert [r.getMessage() for r in caplog.records] == \
        ["compiling the test kernels (once per environment: a minute or two on 2 cores)"]


def test_a_bad_batch_size_is_refused_before_any_model_is_loaded(tmp_path, capsys):
    # the model does not exist: had it been loaded first, the error would name the missing model instead
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "piqa", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1 example per forward, got 0" in capsys.readouterr().err


def test_eval_of_a_gguf_file_is_perplexity_through_llama_cpp_or_a_named_refusal(tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "m.gguf"
    assert main(["eval", str(gguf)]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    gguf.write_bytes(b"GGUF")
    assert main(["eval", str(gguf), "--tasks", "arc_easy"]) == 2
    assert "perplexity only" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # as if the llamacpp extra were not installed
    assert main(["eval", str(gguf)]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp is not installed" in err and "llama-cpp-python" in err
