"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168): exact match of the final number of a worked answer.

The prompt is lm-evaluation-harness's `gsm8k` shape, with 8 worked examples (chain of thought, Wei
et al. 2022) drawn from the train pool: "Question: ...\\nAnswer: <reasoning>\\n#### <number>\\n\\n".
Two extractions, as lm-eval reports them:
- strict: the number after the first "#### " (the model must keep the examples' format);
- flexible: the last number anywhere in the output.
Both sides are normalised the same way (",", "$" and a final "." dropped) before comparing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

STOP = ("Question:", "</s>", "<|im_end|>")
MAX_GEN_TOKS = 256

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
"""A run of digits with $ . , inside (two characters at least), or a bare integer."""


def normalise(number: str) -> str:
    return number.strip().replace(",", "").replace("$", "").rstrip(".")


def reference(answer: str) -> str:
    """The gold number: what follows "####" on the answer's last line."""
    return normalise(answer.rsplit("####", 1)[-1])


def extract_strict(output: str) -> str | None:
    match = STRICT.search(output)
    return normalise(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    found = FLEXIBLE.findall(output)
    if not found:
        return None
    last = found[-1]
    return normalise(last[0] or last[1])


def exact_match(outputs: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """The share of outputs whose extracted number equals the reference, per extraction."""
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs but {len(answers)} answers")
    gold = [reference(a) for a in answers]
    strict = sum(extract_strict(o) == g for o, g in zip(outputs, gold))
    flexible = sum(extract_flexible(o) == g for o, g in zip(outputs, gold))
    n = max(1, len(outputs))
    return {"exact_match_strict": strict / n, "exact_match_flexible": flexible / n}
