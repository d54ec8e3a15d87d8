"""Run tasks on a backend and collect metric rows: evaluate(backend, tasks, settings) -> Report.

A backend is anything with `name`, `loglikelihood(pairs, progress)` and `loglikelihood_rolling(texts,
progress)`: LocalModel (loglik.py) for a Corral model, ServerModel (server_backend.py) for an
OpenAI-compatible endpoint. Each task kind has its runner in KIND_RUNNERS; every request of a task goes to
the backend in one call, so contexts shared between examples (a few-shot prefix) are computed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.eval import gentasks, metrics, tasks
from corral.eval.tasks import Doc, Task

Progress = Callable[[int], None]


@dataclass
class EvalSettings:
    limit: int | None = None
    """Score only the first N examples of each task."""
    shots: int | None = None
    """Few-shot examples per question (None: each task's own default, e.g. MMLU 5)."""
    seed: int = 1234
    """Seed of the few-shot draws (and of sampling in generation tasks)."""
    data_dir: str | None = None
    """Where the task files are (None: CORRAL_EVAL_DATA or the repository's data/eval)."""
    text: str | None = None
    """The perplexity task's text file (default: the held-out corpus file)."""
    samples: int = 1
    """Generation tasks: completions per prompt (1 = greedy; n > 1 samples at T=0.8 for pass@k, k <= n)."""
    chat: bool = False
    """Generation tasks: each prompt as one user turn through the model's chat template."""


@dataclass
class Row:
    task: str
    metric: str
    value: float
    stderr: float
    n: int


@dataclass
class Report:
    model: str
    config: dict[str, Any]
    seed: int
    duration: float = 0.0
    results: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shots(task: Task, settings: EvalSettings) -> int:
    return task.shots if settings.shots is None else settings.shots


def _docs(task: Task, settings: EvalSettings) -> list[Doc]:
    docs = tasks.load_docs(task, settings.data_dir)
    return docs[: settings.limit] if settings.limit else docs


def _prefixes(task: Task, docs: list[Doc], settings: EvalSettings) -> list[str]:
    """Each example's few-shot prefix (empty at 0 shots)."""
    k = _shots(task, settings)
    pool = tasks.load_docs(task, settings.data_dir, source=task.fewshot) if k and task.fewshot else docs
    return [tasks.fewshot_prefix(doc, tasks.fewshot_examples(task, docs, pool, i, k, settings.seed))
            for i, doc in enumerate(docs)]


def _contexts(task: Task, docs: list[Doc], settings: EvalSettings) -> list[list[tuple[str, str]]]:
    """Each example's (context, continuation) pairs, few-shot prefix included."""
    return [tasks.requests(task, doc, prefix) for doc, prefix in zip(docs, _prefixes(task, docs, settings))]


def _score_all(backend, per_doc: list[list[tuple[str, str]]], progress: Progress | None) -> list[list[float]]:
    flat = [pair for pairs in per_doc for pair in pairs]
    scores = backend.loglikelihood(flat, progress)
    out, at = [], 0
    for pairs in per_doc:
        out.append([ll for ll, _ in scores[at:at + len(pairs)]])
        at += len(pairs)
    return out


def _rows(task: Task, values: dict[str, list[float]]) -> list[Row]:
    rows = []
    for metric in task.metrics:
        mean, stderr = metrics.mean_stderr(values[metric])
        rows.append(Row(task.name, metric, mean, stderr, len(values[metric])))
    return rows


def run_choice(task: Task, backend, settings: EvalSettings, progress: Progress | None) -> list[Row]:
    docs = _docs(task, settings)
    lls = _score_all(backend, _contexts(task, docs, settings), progress)
    per_doc = [metrics.choice_scores(ll, doc.choices, doc.gold) for ll, doc in zip(lls, docs)]
    return _rows(task, {m: [d[m] for d in per_doc] for m in ("acc", "acc_norm")})


def run_mc2(task: Task, backend, settings: EvalSettings, progress: Progress | None) -> list[Row]:
    docs = _docs(task, settings)
    lls = _score_all(backend, _contexts(task, docs, settings), progress)
    return _rows(task, {"acc": [metrics.mc2_score(ll, doc.labels) for ll, doc in zip(lls, docs)]})


def run_perplexity(task: Task, backend, settings: EvalSettings, progress: Progress | None) -> list[Row]:
    if settings.text:
        path = Path(settings.text)
        source = str(path if path.is_absolute() else Path.cwd() / path)
        docs = tasks.load_docs(task, settings.data_dir, source=source)
    else:
        docs = _docs(task, settings)
    texts = [d.query for d in docs]
    values = metrics.perplexities(backend.loglikelihood_rolling(texts, progress), texts)
    return [Row(task.name, m, values[m], 0.0, len(texts)) for m in task.metrics]


def run_generation(task: Task, backend, settings: EvalSettings, progress: Progress | None) -> list[Row]:
    """Prompts (few-shot prefix + query) -> backend.generate -> the task's scorer (gentasks.py)."""
    docs = _docs(task, settings)
    prompts = [prefix + doc.query for doc, prefix in zip(docs, _prefixes(task, docs, settings))]
    values, _ = gentasks.run_generation(task.name, prompts, [d.row for d in docs],
                                        lambda requests: backend.generate(requests, progress),
                                        samples=settings.samples, seed=settings.seed, chat=settings.chat)
    return [Row(task.name, m, v, values.get(f"{m}_stderr", 0.0), len(docs))
            for m, v in values.items() if not m.endswith("_stderr")]


KIND_RUNNERS: dict[str, Callable[[Task, Any, EvalSettings, Progress | None], list[Row]]] = {
    "choice": run_choice,
    "partial": run_choice,
    "mc2": run_mc2,
    "perplexity": run_perplexity,
    "generation": run_generation,
}


def request_count(task: Task, settings: EvalSettings) -> int:
    """How many units the progress bar of a task counts (requests, or documents for perplexity)."""
    if task.kind in ("perplexity", "generation"):
        return 1 if task.kind == "perplexity" and settings.text else len(_docs(task, settings))
    return sum(len(tasks.requests(task, d)) for d in _docs(task, settings))


def evaluate(backend, task_list: list[Task], settings: EvalSettings, *, config: dict[str, Any] | None = None,
             progress_for: Callable[[Task, int], Progress] | None = None) -> Report:
    """Every task's metric rows on one backend; progress_for(task, total) gives a task's progress callback."""
    report = Report(model=backend.name, config=dict(config or {}, tasks=[t.name for t in task_list],
                                                    limit=settings.limit, shots=settings.shots),
                    seed=settings.seed)
    started = time.perf_counter()
    for task in task_list:
        progress = progress_for(task, request_count(task, settings)) if progress_for else None
        report.results += KIND_RUNNERS[task.kind](task, backend, settings, progress)
    report.duration = round(time.perf_counter() - started, 3)
    return report
