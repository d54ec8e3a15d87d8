"""A `corral` model type for lm-evaluation-harness: any lm-eval task whose data is local runs on Corral.

    python -m corral.eval.harness run --model corral --model_args pretrained=PATH_OR_NAME --tasks hellaswag

takes exactly lm_eval's command line. lm_eval 0.4 finds models only in its own registry (no plugin entry
points), so a plain `lm_eval --model corral` cannot see this class; this module registers it, then hands
the arguments to lm_eval's own CLI. From Python, `register()` then `lm_eval.simple_evaluate(model="corral",
...)`. The numbers are `corral eval`'s: log-likelihoods come from the same LocalModel, generations from
the same engine runner. This is the only Corral module that imports lm_eval (a test and bench peer).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from tqdm import tqdm

from corral.eval.commands import open_model
from corral.eval.generation import GenRequest, generate_local
from corral.eval.loglik import LocalModel

NAME = "corral"


class CorralLM(LM):
    """model_args: pretrained (a path, a store name, or empty for the embedded SmolLM2), quant (gguf, none,
    int8, int4), max_length (tokens of context), batch_size (continuations per forward). lm-eval's own
    device and max_batch_size are accepted and ignored (Corral runs on the CPU here)."""

    def __init__(self, pretrained: str | None = None, quant: str | None = None, max_length: int | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None,
                 **_: Any):
        super().__init__()
        self.llm = open_model(pretrained or None, quant)
        per_forward = int(batch_size) if str(batch_size or "").isdigit() else 32
        self.scorer = LocalModel.from_llm(self.llm, max_length=int(max_length) if max_length else None,
                                          batch_size=per_forward)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with _bar(len(requests), "loglikelihood", disable_tqdm) as bar:
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests], bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        with _bar(len(requests), "loglikelihood_rolling", disable_tqdm) as bar:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests], bar.update)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        gens = [gen_request(*r.args[:2]) for r in requests]
        with _bar(len(requests), "generate_until", disable_tqdm) as bar:
            return [texts[0] for texts in generate_local(self.llm, gens, progress=bar.update)]


def gen_request(context: str, kwargs: dict | None) -> GenRequest:
    """lm-eval's gen_kwargs (until, max_gen_toks, do_sample, temperature) as a GenRequest."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    sampled = kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0
    return GenRequest(context, until=until, max_gen_toks=int(kwargs.get("max_gen_toks", 256)),
                      temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0)


def _bar(total: int, what: str, disable: bool):
    return tqdm(total=total, desc=f"corral {what}", disable=disable, unit="req")


def register() -> None:
    """Put `corral` into lm_eval's model registry (idempotent)."""
    model_registry.register(NAME, target=CorralLM)


def main(argv: Sequence[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
