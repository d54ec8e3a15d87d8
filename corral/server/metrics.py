"""Server counters in Prometheus' text exposition format (version 0.0.4), written by hand.

    corral_requests_total{route,status}          counter   every answered HTTP request
    corral_prompt_tokens_total{model}            counter   prompt tokens prefilled
    corral_generated_tokens_total{model}         counter   tokens generated
    corral_requests_running{model}               gauge     requests holding a cache slot
    corral_requests_queued{model}                gauge     requests waiting for a slot
    corral_time_to_first_token_seconds{model}    histogram submit -> first token
    corral_tokens_per_second{model}              gauge     decode rate of the last finished request
    corral_models_loaded, corral_model_loads_total

Everything is updated on the event loop's thread, so plain dicts are enough.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative (made cumulative on output)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.sum += value


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generated_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.tokens_per_second: dict[str, float] = {}

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def record_generation(self, model: str, prompt_tokens: int, generated: int, first_token_s: float | None,
                          decode_s: float | None) -> None:
        """One finished generation (all n samples of a request together)."""
        self.prompt_tokens[model] += prompt_tokens
        self.generated_tokens[model] += generated
        if first_token_s is not None:
            self.ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(first_token_s)
        if decode_s and generated > 1:
            self.tokens_per_second[model] = (generated - 1) / decode_s

    def forget(self, model: str) -> None:
        """Drop a deleted model's series (a scrape lists only models that exist)."""
        for table in (self.prompt_tokens, self.generated_tokens, self.ttft, self.tokens_per_second):
            table.pop(model, None)

    def render(self, pool) -> str:
        """The exposition text; scheduler gauges are read from the pool at scrape time."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("corral_requests_total", "counter", "HTTP requests answered, by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f"corral_requests_total{_labels(route=route, status=str(status))} {n}")
        family("corral_prompt_tokens_total", "counter", "Prompt tokens prefilled.")
        for model, n in sorted(self.prompt_tokens.items()):
            out.append(f"corral_prompt_tokens_total{_labels(model=model)} {n}")
        family("corral_generated_tokens_total", "counter", "Tokens generated.")
        for model, n in sorted(self.generated_tokens.items()):
            out.append(f"corral_generated_tokens_total{_labels(model=model)} {n}")
        self._render_scheduler_gauges(out, family, pool)
        family("corral_time_to_first_token_seconds", "histogram", "Seconds from submit to the first token.")
        for model, h in sorted(self.ttft.items()):
            cumulative = 0
            for bound, n in zip(h.buckets, h.counts):
                cumulative += n
                out.append(f"corral_time_to_first_token_seconds_bucket{_labels(model=model, le=_num(bound))} "
                           f"{cumulative}")
            out.append(f"corral_time_to_first_token_seconds_bucket{_labels(model=model, le='+Inf')} {h.count}")
            out.append(f"corral_time_to_first_token_seconds_sum{_labels(model=model)} {_num(h.sum)}")
            out.append(f"corral_time_to_first_token_seconds_count{_labels(model=model)} {h.count}")
        family("corral_tokens_per_second", "gauge", "Decode rate of the last finished request.")
        for model, rate in sorted(self.tokens_per_second.items()):
            out.append(f"corral_tokens_per_second{_labels(model=model)} {_num(rate)}")
        family("corral_models_loaded", "gauge", "Models in memory.")
        out.append(f"corral_models_loaded {len(pool.loaded())}")
        family("corral_model_loads_total", "counter", "Model loads since start.")
        out.append(f"corral_model_loads_total {pool.loads}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _render_scheduler_gauges(out: list[str], family, pool) -> None:
        models = list(pool.loaded()) + pool.draining()
        family("corral_requests_running", "gauge", "Requests holding a KV cache slot.")
        running = defaultdict(int)
        queued = defaultdict(int)
        for m in models:
            running[m.name] += m.scheduler.running
            queued[m.name] += m.scheduler.queued
        for name in sorted(running):
            out.append(f"corral_requests_running{_labels(model=name)} {running[name]}")
        family("corral_requests_queued", "gauge", "Requests waiting for a slot.")
        for name in sorted(queued):
            out.append(f"corral_requests_queued{_labels(model=name)} {queued[name]}")
