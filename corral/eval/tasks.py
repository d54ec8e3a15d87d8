"""Evaluation tasks as data: TASKS maps a name to a Task (kind, file, row format, metrics, shots).

A row format (ROWS) turns one JSON line of `data/eval/<task>/` into a Doc: the prompt text, the choice
strings and the gold index, written as lm-evaluation-harness writes each task's prompt (so the numbers
compare with its tables). `requests` then makes the (context, continuation) pairs the log-likelihood core
scores. The folders' READMEs give each format and its original scoring.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import EvalDataError, UnknownTaskError

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"
"""The dev parts shipped with the repository; CORRAL_EVAL_DATA or --data-dir points elsewhere (held-out parts)."""

KINDS = ("choice", "partial", "mc2", "generation", "perplexity")
"""choice: one context, a continuation per choice. partial: a context per choice, one shared continuation
(WinoGrande's partial scoring). mc2: TruthfulQA's probability mass on the true answers. generation: sampled
text scored by the generation tasks. perplexity: rolling log-likelihood of whole documents."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    data: str
    """The rows: a file under the data directory."""
    row: str
    """The row format: a key of ROWS."""
    metrics: tuple[str, ...]
    shots: int = 0
    """Few-shot examples before each question unless --shots says otherwise."""
    fewshot: str | None = None
    """Where few-shot examples come from: a file under the data directory; None = other rows of `data`."""
    fewshot_same_group: bool = False
    """Draw few-shot examples from rows of the same group (MMLU: the same subject), first ones first."""


@dataclass(frozen=True)
class Doc:
    """One example. choices are lm-eval's doc_to_choice strings (no leading delimiter)."""

    query: str
    choices: tuple[str, ...] = ()
    gold: int = 0
    target: str = ""
    """The gold answer as a few-shot example writes it after `query`."""
    labels: tuple[int, ...] = ()
    """mc2: 1 for each true answer, 0 for each false one."""
    continuation: str = ""
    """partial: the text after the blank, shared by every choice."""
    group: str = ""
    """A sub-part to report on its own (MMLU's subject)."""
    description: str = ""
    """Text before the few-shot examples (MMLU's subject line)."""
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The raw JSON row (generation scorers read their own fields)."""


# ---- row formats: raw JSON row -> Doc --------------------------------------------------------------


class _BadField(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _get(row: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in row:
        raise _BadField(name, f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _BadField(name, f"field {name!r} should be {want}, got {type(value).__name__}")
    return value


def _strings(row: dict, name: str, n: int | None = None) -> list[str]:
    values = _get(row, name, list)
    if not values or not all(isinstance(v, str) for v in values) or (n is not None and len(values) != n):
        raise _BadField(name, f"field {name!r} should be a list of {n or 'some'} strings")
    return values


def _index(row: dict, name: str, n: int) -> int:
    value = _get(row, name, int)
    if not 0 <= value < n:
        raise _BadField(name, f"field {name!r} = {value} is outside 0..{n - 1}")
    return value


def _choice_doc(row: dict, query: str, choices: list[str], gold_field: str) -> Doc:
    gold = _index(row, gold_field, len(choices))
    return Doc(query, tuple(choices), gold, target=choices[gold], row=row)


def hellaswag_doc(row: dict) -> Doc:
    # lm-eval hellaswag: "<activity_label>: <ctx>" and " " + ending; the text is already preprocessed.
    query = _get(row, "activity_label", str) + ": " + _get(row, "ctx", str)
    return _choice_doc(row, query, _strings(row, "endings", 4), "label")


def question_answer_doc(row: dict) -> Doc:
    # ARC (query "Question: <q>") and PIQA (query "Question: <goal>\n"): lm-eval asks "Question: ...\nAnswer:".
    query = _get(row, "query", str)
    query = query + ("Answer:" if query.endswith("\n") else "\nAnswer:")
    return _choice_doc(row, query, _strings(row, "choices"), "gold")


def boolq_doc(row: dict) -> Doc:
    # lm-eval boolq: "<passage>\nQuestion: <question>?\nAnswer:" with " no" / " yes"; this copy adds "Passage: ".
    query = _get(row, "query", str).removeprefix("Passage: ") + "\nAnswer:"
    return _choice_doc(row, query, _strings(row, "choices", 2), "gold")


def winogrande_doc(row: dict) -> Doc:
    # Partial scoring (GPT-3, lm-eval winogrande): log p(" " + rest | sentence up to the blank, option filled).
    contexts = _strings(row, "context_options", 2)
    gold = _index(row, "gold", 2)
    rest = " " + _get(row, "continuation", str).strip()
    return Doc("", tuple(contexts), gold, target=rest, continuation=rest, row=row)


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_doc(row: dict) -> Doc:
    # Hendrycks et al. 2021 / lm-eval mmlu: question, lettered options, "Answer:"; choices " A".." D".
    subject = _get(row, "subject", str)
    options = _strings(row, "choices", 4)
    lines = [_get(row, "question", str).strip()] + [f"{k}. {v}" for k, v in zip(MMLU_LETTERS, options)]
    gold = _index(row, "answer", 4)
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return Doc("\n".join(lines) + "\nAnswer:", MMLU_LETTERS, gold, target=MMLU_LETTERS[gold], group=subject,
               description=description, row=row)


TRUTHFULQA_PRIMER = (
    # The fixed 6-example QA prompt of Lin et al. 2021 (TruthfulQA), which lm-eval's mc1/mc2 use too.
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _targets(row: dict, name: str) -> tuple[list[str], list[int]]:
    targets = _get(row, name, dict)
    if not targets or not all(v in (0, 1) for v in targets.values()) or 1 not in targets.values():
        raise _BadField(name, f"field {name!r} should map answers to 1 (true) or 0 (false), with a true one")
    return list(targets), list(targets.values())


def truthfulqa_mc1_doc(row: dict) -> Doc:
    choices, labels = _targets(row, "mc1_targets")
    query = TRUTHFULQA_PRIMER + "\n\nQ: " + _get(row, "question", str) + "\nA:"
    return Doc(query, tuple(choices), labels.index(1), target=choices[labels.index(1)], row=row)


def truthfulqa_mc2_doc(row: dict) -> Doc:
    choices, labels = _targets(row, "mc2_targets")
    query = TRUTHFULQA_PRIMER + "\n\nQ: " + _get(row, "question", str) + "\nA:"
    return Doc(query, tuple(choices), labels.index(1), target=choices[labels.index(1)], labels=tuple(labels), row=row)


def gsm8k_doc(row: dict) -> Doc:
    # The few-shot prefix puts " " between query and target: "Question: ...\nAnswer: <reasoning>\n#### N".
    return Doc("Question: " + _get(row, "question", str) + "\nAnswer:", target=_get(row, "answer", str), row=row)


def humaneval_doc(row: dict) -> Doc:
    for name in ("task_id", "test", "entry_point"):
        _get(row, name, str)
    return Doc(_get(row, "prompt", str), target=_get(row, "canonical_solution", str), row=row)


def text_doc(row: dict) -> Doc:
    return Doc(_get(row, "text", str), row=row)


ROWS: dict[str, Callable[[dict], Doc]] = {
    "hellaswag": hellaswag_doc,
    "question_answer": question_answer_doc,
    "boolq": boolq_doc,
    "winogrande": winogrande_doc,
    "mmlu": mmlu_doc,
    "truthfulqa_mc1": truthfulqa_mc1_doc,
    "truthfulqa_mc2": truthfulqa_mc2_doc,
    "gsm8k": gsm8k_doc,
    "humaneval": humaneval_doc,
    "text": text_doc,
}

_MC = ("acc", "acc_norm")
TASKS: dict[str, Task] = {
    "hellaswag": Task("hellaswag", "choice", "hellaswag/hellaswag_val_dev.jsonl", "hellaswag", _MC),
    "arc_easy": Task("arc_easy", "choice", "arc_easy/arc_easy_dev.jsonl", "question_answer", _MC),
    "arc_challenge": Task("arc_challenge", "choice", "arc_challenge/arc_challenge_dev.jsonl", "question_answer", _MC),
    "piqa": Task("piqa", "choice", "piqa/piqa_dev.jsonl", "question_answer", _MC),
    "boolq": Task("boolq", "choice", "boolq/boolq_dev.jsonl", "boolq", ("acc",)),
    "winogrande": Task("winogrande", "partial", "winogrande/winogrande_dev.jsonl", "winogrande", ("acc",)),
    "mmlu": Task("mmlu", "choice", "mmlu/mmlu_test_dev.jsonl", "mmlu", ("acc",), shots=5,
                 fewshot="mmlu/mmlu_fewshot_dev.jsonl", fewshot_same_group=True),
    "truthfulqa_mc1": Task("truthfulqa_mc1", "choice", "truthfulqa/truthfulqa_dev.jsonl", "truthfulqa_mc1", ("acc",)),
    "truthfulqa_mc2": Task("truthfulqa_mc2", "mc2", "truthfulqa/truthfulqa_dev.jsonl", "truthfulqa_mc2", ("acc",)),
    "gsm8k": Task("gsm8k", "generation", "gsm8k/gsm8k_test_dev.jsonl", "gsm8k",
                  ("exact_match_strict", "exact_match_flexible"), shots=8, fewshot="gsm8k/gsm8k_train_fewshot.jsonl"),
    "humaneval": Task("humaneval", "generation", "humaneval/humaneval_dev.jsonl", "humaneval", ("pass@1",)),
    "perplexity": Task("perplexity", "perplexity", "../corpus/gutenberg/alice_in_wonderland.txt", "text",
                       ("word_perplexity", "byte_perplexity", "bits_per_byte")),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def parse_task_list(text: str) -> list[Task]:
    """"hellaswag,arc_easy" -> Tasks, in order; an unknown name is an UnknownTaskError listing the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownTaskError(f"no task named; known tasks: {', '.join(TASKS)}")
    return [get_task(n) for n in names]


def data_dir(override: str | Path | None = None) -> Path:
    return Path(override or os.environ.get("CORRAL_EVAL_DATA") or DATA_DIR)


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) of each non-empty line; a line that is not a JSON object is an EvalDataError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError("file not found (point --data-dir or CORRAL_EVAL_DATA at the eval data)",
                            path=str(path), line=0) from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"not UTF-8 ({e.reason})", path=str(path), line=text_line(path, e.start)) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"not JSON ({e.msg})", path=str(path), line=number) from None
        if not isinstance(row, dict):
            raise EvalDataError("a row must be a JSON object", path=str(path), line=number)
        rows.append((number, row))
    return rows


def text_line(path: Path, offset: int) -> int:
    return path.read_bytes()[:offset].count(b"\n") + 1


def load_docs(task: Task, root: str | Path | None = None, *, source: str | None = None) -> list[Doc]:
    """Every row of the task's file (or `source`, relative to the data directory) as a Doc.

    A plain text file (not .jsonl) is one document: the perplexity task reads the corpus that way.
    """
    path = data_dir(root) / (source or task.data)
    if task.row == "text" and path.suffix != ".jsonl":
        try:
            return [Doc(path.read_text(encoding="utf-8"))]
        except (FileNotFoundError, UnicodeDecodeError) as e:
            raise EvalDataError(f"cannot read text ({e.__class__.__name__})", path=str(path), line=0) from None
    parse = ROWS[task.row]
    docs = []
    for number, row in read_rows(path):
        try:
            docs.append(parse(row))
        except _BadField as e:
            raise EvalDataError(str(e), path=str(path), line=number, field=e.field) from None
    return docs


def fewshot_examples(task: Task, docs: list[Doc], pool: list[Doc], index: int, k: int, seed: int) -> list[Doc]:
    """The k examples shown before docs[index]: the first k of its group (MMLU), else k other rows drawn with
    a seed fixed per example (lm-eval draws from a training split; these dev files have none, so the
    drawn rows exclude the question itself)."""
    if k <= 0:
        return []
    if task.fewshot_same_group:
        return [d for d in pool if d.group == docs[index].group][:k]
    candidates = [d for i, d in enumerate(pool) if not (pool is docs and i == index)]
    return random.Random(seed * 1_000_003 + index).sample(candidates, min(k, len(candidates)))


def fewshot_prefix(doc: Doc, examples: list[Doc]) -> str:
    """lm-eval's context before a question: description, then each example's text, " ", its answer, "\n\n"."""
    shown = [(e.choices[e.gold] if e.continuation else e.query) + (e.target if e.continuation else " " + e.target)
             for e in examples]
    return doc.description + "".join(text + "\n\n" for text in shown)


def requests(task: Task, doc: Doc, prefix: str = "") -> list[tuple[str, str]]:
    """The (context, continuation) pairs one Doc asks the model to score, one per choice."""
    if task.kind == "partial":
        return [(prefix + choice, doc.continuation) for choice in doc.choices]
    return [(prefix + doc.query, " " + choice) for choice in doc.choices]
