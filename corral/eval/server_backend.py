"""`corral eval --server URL --model NAME`: any OpenAI-compatible endpoint as an evaluation backend.

Log-likelihood asks /v1/completions for the prompt context + continuation with `echo: true, logprobs: 1,
max_tokens: 1, temperature: 0` (as lm-eval's completions backends do) and sums the log-probabilities of the
echoed tokens that start at or after the continuation's first character (text_offset), so no local
tokenizer is needed; greedy = each of those tokens is its position's top alternative. The one generated
token is ignored. Generation (GSM8K, HumanEval) uses /v1/completions, or /v1/chat/completions with --chat.
A timeout, a refused connection or a 5xx is retried with exponential backoff, then becomes an
EvalServerError naming the URL.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from corral.errors import EvalServerError
from corral.eval.generation import GenRequest, cut_at


class ServerModel:
    def __init__(self, url: str, model: str, *, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 8, api_key: str | None = None):
        self.url, self.name = url.rstrip("/"), model
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.api_key = api_key

    # ---- HTTP with retries ---------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON, retrying timeouts, refused connections and 5xx; a 4xx is an error at once."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code < 500:
                    raise EvalServerError(f"{self.url}{path} answered {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                last = str(getattr(e, "reason", e)) or e.__class__.__name__
            except json.JSONDecodeError:
                raise EvalServerError(f"{self.url}{path} answered something that is not JSON") from None
        raise EvalServerError(f"{self.url}{path} did not answer after {self.retries + 1} tries "
                              f"(timeout {self.timeout:g} s): {last}")

    # ---- log-likelihood ------------------------------------------------------------------------------

    def _echo(self, prompts: list[str]) -> list[dict]:
        body = {"model": self.name, "prompt": prompts, "max_tokens": 1, "temperature": 0, "echo": True,
                "logprobs": 1}
        choices = sorted(self.post("/v1/completions", body).get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or not all(isinstance(c.get("logprobs"), dict) for c in choices):
            raise EvalServerError(f"{self.url}/v1/completions did not echo prompt log-probabilities "
                                  "(the server must support echo with logprobs)")
        return [c["logprobs"] for c in choices]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None
                      ) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        for lo in range(0, len(pairs), self.batch_size):
            batch = [_move_spaces(c, x) for c, x in pairs[lo:lo + self.batch_size]]
            for (context, continuation), lp in zip(batch, self._echo([c + x for c, x in batch])):
                out.append(_continuation_score(lp, len(context), len(context) + len(continuation)))
            if progress is not None:
                progress(len(batch))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Callable[[int], None] | None = None
                              ) -> list[float]:
        """Total log p of each text's tokens after its first (the server sees no BOS-only context)."""
        out = []
        for text in texts:
            lp = self._echo([text])[0]
            out.append(_continuation_score(lp, 0, len(text))[0])
            if progress is not None:
                progress(1)
        return out

    # ---- generation ----------------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], **params: Any) -> str:
        """The assistant's answer from /v1/chat/completions (params: max_tokens, temperature, stop, seed...)."""
        answer = self.post("/v1/chat/completions", {"model": self.name, "messages": messages, **params})
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EvalServerError(f"{self.url}/v1/chat/completions answered without choices[0].message") from None


    def generate(self, requests: Sequence[GenRequest], progress: Callable[[int], None] | None = None
                 ) -> list[list[str]]:
        """Completions of each GenRequest: /v1/completions for a plain prompt, /v1/chat/completions with chat."""
        out = []
        for req in requests:
            params: dict[str, Any] = {"max_tokens": req.max_gen_toks, "temperature": req.temperature}
            if req.until:
                params["stop"] = list(req.until[:4])  # OpenAI takes at most 4; the rest are cut below
            if req.temperature > 0:
                params["top_p"] = 0.95
            if req.chat:  # one request per sample: chat() reads choices[0]
                texts = [self.chat([{"role": "user", "content": req.prompt}], seed=req.seed + i, **params)
                         for i in range(req.samples)]
            else:
                texts = self._complete(req.prompt, n=req.samples, seed=req.seed, **params)
            out.append([cut_at(t, req.until) for t in texts])
            if progress is not None:
                progress(1)
        return out

    def _complete(self, prompt: str, **params: Any) -> list[str]:
        answer = self.post("/v1/completions", {"model": self.name, "prompt": prompt, **params})
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != params.get("n", 1) or not all(isinstance(c.get("text"), str) for c in choices):
            raise EvalServerError(f"{self.url}/v1/completions answered without {params.get('n', 1)} choices[].text")
        return [c["text"] for c in choices]


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


def _continuation_score(lp: dict, start: int, end: int) -> tuple[float, bool]:
    """Sum and all-greedy of the echoed tokens whose text starts in [start, end) (the generated token is after)."""
    total, greedy = 0.0, True
    tops = lp.get("top_logprobs") or [None] * len(lp["token_logprobs"])
    for logprob, offset, top in zip(lp["token_logprobs"], lp["text_offset"], tops):
        if not start <= offset < end or logprob is None:
            continue
        total += logprob
        if top:
            greedy &= max(top.values()) <= logprob + 1e-6
    return total, greedy
