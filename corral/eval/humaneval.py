"""HumanEval (Chen et al. 2021, arXiv 2107.03374): functional correctness of model-written code, pass@k.

A sample is `prompt + completion`, then the task's `test` source, then `check(<entry_point>)`, run
in the sandbox (corral.eval.sandbox); it passes when the program exits 0 within the limits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.eval.generation import cut_at
from corral.eval.sandbox import DEFAULT_LIMITS, SandboxLimits, SandboxResult, run_many

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint", "\n#")
"""Where a completion ends: the next top-level statement (the reference harness's stop sequences)."""
MAX_GEN_TOKS = 512


@dataclass
class SampleResult:
    task_id: str
    completion: str
    passed: bool
    status: str
    """The sandbox's verdict: "passed", "failed" or "timeout"."""
    error: str
    """The last line of stderr (why it failed), empty when it passed."""


def program(row: Mapping[str, str], completion: str) -> str:
    """The source the sandbox runs for one sample."""
    return f"{row['prompt']}{completion}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, eq. 1).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}")
    if n - c < k:  # every size-k subset holds a passing sample
        return 1.0
    failing_all = 1.0
    for i in range(n - c + 1, n + 1):
        failing_all *= 1.0 - k / i
    return 1.0 - failing_all


def run_samples(rows: Sequence[Mapping[str, str]], completions: Sequence[Sequence[str]],
                limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 2) -> list[list[SampleResult]]:
    """Run every completion of every task (completions[i] belongs to rows[i]) in the sandbox."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} tasks but {len(completions)} lists of completions")
    flat = [(row, text) for row, texts in zip(rows, completions) for text in texts]
    verdicts = run_many([program(row, text) for row, text in flat], limits, workers=workers)
    results = [_sample(row, text, v) for (row, text), v in zip(flat, verdicts)]
    out, start = [], 0
    for texts in completions:
        out.append(results[start:start + len(texts)])
        start += len(texts)
    return out


def _sample(row: Mapping[str, str], completion: str, verdict: SandboxResult) -> SampleResult:
    lines = verdict.stderr.strip().splitlines()
    error = "" if verdict.passed else ("timeout" if verdict.status == "timeout" else (lines[-1] if lines else ""))
    return SampleResult(row["task_id"], completion, verdict.passed, verdict.status, error)


def score(results: Sequence[Sequence[SampleResult]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """pass@k averaged over tasks, for each k no larger than the fewest samples any task has."""
    if not results:
        return {}
    fewest = min(len(r) for r in results)
    metrics = {}
    for k in ks:
        if k <= fewest:
            metrics[f"pass@{k}"] = sum(pass_at_k(len(r), sum(s.passed for s in r), k) for r in results) / len(results)
    return metrics


FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)


def from_chat(row: Mapping[str, str], answer: str) -> str:
    """A chat answer as a completion: its first fenced code block, which usually repeats the whole function
    (then it follows the prompt at the top level and redefines the function), else the text as a body."""
    match = FENCE.search(answer)
    if match is None:
        return truncate(answer)
    code = match.group(1)
    if re.search(rf"^def {re.escape(row['entry_point'])}\(", code, re.M):
        return "\n" + code
    return truncate(code)


def truncate(completion: str, stop: Sequence[str] = STOP) -> str:
    """Cut a completion at its first stop sequence (a server may not apply all of them)."""
    return cut_at(completion, stop)
