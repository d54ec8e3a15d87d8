"""Generation tasks: prompts in, generated text out, then the task's own scorer (GSM8K, HumanEval).

`run_generation(name, prompts, rows, generate)` is backend-neutral: `generate` takes GenRequests and
returns each request's completions (generation.generate_local over the engine, or the server client).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from corral.eval import gsm8k, humaneval
from corral.eval.generation import GenRequest
from corral.eval.metrics import mean_stderr

Generate = Callable[[Sequence[GenRequest]], list[list[str]]]


@dataclass(frozen=True)
class GenTask:
    until: tuple[str, ...]
    max_gen_toks: int
    score: Callable[[Sequence[Mapping], list[list[str]], int, bool], tuple[dict[str, float], list[dict]]]
    """(rows, completions per row, samples per row, chat) -> (metrics, one record per row)."""


def score_gsm8k(rows: Sequence[Mapping], outputs: list[list[str]], samples: int, chat: bool
                ) -> tuple[dict[str, float], list[dict]]:
    firsts = [texts[0] for texts in outputs]
    records = [{"output": out, "gold": gsm8k.reference(row["answer"]), "strict": gsm8k.extract_strict(out),
                "flexible": gsm8k.extract_flexible(out)} for row, out in zip(rows, firsts)]
    metrics = {}
    for kind in ("strict", "flexible"):
        hits = [float(r[kind] == r["gold"]) for r in records]
        metrics[f"exact_match_{kind}"], metrics[f"exact_match_{kind}_stderr"] = mean_stderr(hits)
    return metrics, records


def score_humaneval(rows: Sequence[Mapping], outputs: list[list[str]], samples: int, chat: bool
                    ) -> tuple[dict[str, float], list[dict]]:
    extract = humaneval.from_chat if chat else (lambda row, text: humaneval.truncate(text))
    completions = [[extract(row, t) for t in texts] for row, texts in zip(rows, outputs)]
    results = humaneval.run_samples(rows, completions)
    ks = [k for k in (1, 10, 100) if k <= samples]
    metrics = humaneval.score(results, ks)
    metrics["pass@1_stderr"] = mean_stderr([humaneval.pass_at_k(len(r), sum(s.passed for s in r), 1)
                                            for r in results])[1]
    records = [{"task_id": r[0].task_id, "passed": [s.passed for s in r], "status": [s.status for s in r],
                "error": [s.error for s in r], "completion": r[0].completion} for r in results]
    return metrics, records


GEN_TASKS: dict[str, GenTask] = {
    "gsm8k": GenTask(gsm8k.STOP, gsm8k.MAX_GEN_TOKS, score_gsm8k),
    "humaneval": GenTask(humaneval.STOP, humaneval.MAX_GEN_TOKS, score_humaneval),
}


def run_generation(name: str, prompts: Sequence[str], rows: Sequence[Mapping], generate: Generate, *,
                   samples: int = 1, temperature: float | None = None, seed: int = 1234,
                   max_gen_toks: int | None = None, chat: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Generate for every prompt (rows[i] is prompts[i]'s data row), then score; (metrics, records).

    samples > 1 draws at temperature 0.8 unless told otherwise (Chen et al. 2021 for pass@k); 1 is greedy.
    chat: each prompt goes as one user message through the chat template; with it the stop strings are
    not applied (an instruct model answers in its own shape) and HumanEval takes the answer's code block.
    """
    task = GEN_TASKS[name]
    if temperature is None:
        temperature = 0.8 if samples > 1 else 0.0
    until = () if chat else task.until
    requests = [GenRequest(p, until=until, max_gen_toks=max_gen_toks or task.max_gen_toks, samples=samples,
                           temperature=temperature, seed=seed, chat=chat) for p in prompts]
    outputs = generate(requests)
    metrics, records = task.score(rows, outputs, samples, chat)
    for record, prompt in zip(records, prompts):
        record["prompt_chars"] = len(prompt)
    return metrics, records

