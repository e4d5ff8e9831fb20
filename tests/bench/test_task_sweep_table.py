"""bench/task_sweep.py's docs table: a variant's mean accuracy as a share of dense's, paired over the same examples."""

import importlib.util
import random
from pathlib import Path

import pytest

from sparsefx.stats import mean_stderr

spec = importlib.util.spec_from_file_location("task_sweep", Path(__file__).resolve().parents[2] / "bench" /
                                              "task_sweep.py")
task_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_sweep)


def _bits(xs):
    return "".join("1" if x else "0" for x in xs)


def test_paired_share_is_the_mean_over_tasks_against_a_reference_loop():
    rng = random.Random(7)
    dense = {t: [rng.random() < p for _ in range(n)] for t, p, n in (("a", 0.7, 50), ("b", 0.4, 31), ("c", 0.5, 9))}
    variant = {t: [x if rng.random() < 0.85 else not x for x in xs] for t, xs in dense.items()}
    share, err = task_sweep.paired_share({t: _bits(v) for t, v in variant.items()},
                                         {t: _bits(v) for t, v in dense.items()})
    mean = lambda xs: sum(xs) / len(xs)
    dense_mean = mean([mean(v) for v in dense.values()])
    assert share == pytest.approx(mean([mean(v) for v in variant.values()]) / dense_mean)
    diffs = [[int(a) - int(b) for a, b in zip(variant[t], dense[t])] for t in dense]
    assert err == pytest.approx((sum(mean_stderr(d) ** 2 for d in diffs) ** 0.5 / 3) / dense_mean)
    same = {t: _bits(v) for t, v in dense.items()}
    assert task_sweep.paired_share(same, same) == (1.0, 0.0)
    assert task_sweep.paired_share({"a": same["a"]}, same) is None          # not the same tasks: no pairing
    with pytest.raises(ValueError):                                           # not the same examples
        task_sweep.paired_share({t: v + "1" for t, v in same.items()}, same)


def test_markdown_shows_the_paired_share_and_falls_back_to_independent_means():
    rows = [{"variant": v, "task": t, "acc": a, "acc_stderr": 0.05, "n": 4}
            for v, base in (("dense", 0.5), ("teal-50", 0.25)) for t, a in (("piqa", base), ("mean", base))]
    meta = {"limit": 4, "mmlu_limit": 1, "variants": {"dense": {"correct": {"piqa": "1100"}},
                                                      "teal-50": {"sparsity": 0.5, "correct": {"piqa": "1000"}}}}
    lines = task_sweep.markdown(rows, meta).splitlines()
    assert lines[0] == "| variant | piqa | mean | mean / dense | bits/w | sparsity |"
    assert lines[2].startswith("| dense | 50.0 ± 5.0 | 50.0 ± 5.0 | 100 % |")
    assert "| 50.0 % ± 50.0 | — | 0.50 |" in lines[3]               # paired: 1 - 0.25/0.5; se 0.25/0.5
    del meta["variants"]["teal-50"]["correct"]
    assert "| 50.0 % ± 11.2 |" in task_sweep.markdown(rows, meta).splitlines()[3]  # independent: .5*sqrt(.2²+.1²)
