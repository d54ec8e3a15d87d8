"""Stream filters on the one generation path (corral.server.generation): input checks before submit, output
filters that rewrite or cut, seen through both dialects as raw SSE / NDJSON bytes (RELIABILITY 36)."""

import json

import pytest

from corral.server.generation import Cut, Prompt

MODEL = "smollm2:135m"
PROMPT = "Write one sentence about cats."
CUT = Cut("content_filter", "[removed]")


class Shout:
    """Output rewritten: upper case."""

    def check_input(self, prompt: Prompt):
        return None

    def output(self):
        return self

    def push(self, text: str) -> str:
        return text.upper()

    def finish(self) -> str:
        return ""


class CutAfter:
    """Output cut once more than `limit` characters have gone by; input with "forbidden" refused."""

    def __init__(self, limit: int):
        self.limit = limit

    def check_input(self, prompt: Prompt):
        words = [m["content"] for m in prompt.messages or []] + [prompt.text or ""]
        return CUT if any("forbidden" in str(w) for w in words) else None

    def output(self):
        return _Counter(self.limit)


class _Counter:
    def __init__(self, limit: int):
        self.limit, self.seen = limit, 0

    def push(self, text: str):
        self.seen += len(text)
        return CUT if self.seen > self.limit else text

    def finish(self) -> str:
        return ""


@pytest.fixture
def filtered(live):
    def install(*filters):
        live.state.filters[:] = filters

    yield install
    live.state.filters[:] = []
    assert live.wait_idle(10) == 0


def sse_frames(live, path: str, body: dict) -> list:
    with live.http() as h, h.stream("POST", path, json={**body, "stream": True}) as r:
        raw = r.read().decode()
    frames = [f.removeprefix("data: ") for f in raw.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def ndjson_lines(live, path: str, body: dict) -> list:
    with live.http() as h, h.stream("POST", path, json=body) as r:
        return [json.loads(x) for x in r.read().decode().splitlines() if x]


def chat_body(content: str = PROMPT, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, **extra}


def test_a_rewriting_filter_changes_every_openai_delta(live, filtered):
    plain = live.client().chat.completions.create(**chat_body()).choices[0].message.content
    filtered(Shout())
    frames = sse_frames(live, "/v1/chat/completions", chat_body())
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames)
    assert plain and text == plain.upper()
    whole = live.client().chat.completions.create(**chat_body()).choices[0].message.content
    assert whole == plain.upper()


def test_a_cut_ends_the_ollama_stream_with_its_reason_and_stops_the_engine(live, filtered):
    body = {"model": MODEL, "prompt": PROMPT, "options": {"temperature": 0, "num_predict": 60}}
    plain = ndjson_lines(live, "/api/generate", {**body, "stream": False})[0]["response"]
    filtered(CutAfter(10))
    before = live.state.metrics.generated_tokens[MODEL]
    lines = ndjson_lines(live, "/api/generate", body)
    shown = "".join(x["response"] for x in lines[:-1])
    assert len(plain) > 30 and shown.endswith("[removed]")
    assert plain.startswith(shown.removesuffix("[removed]")) and len(shown) - len("[removed]") <= 10
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "content_filter"
    assert live.wait_idle(10) == 0
    assert live.state.metrics.generated_tokens[MODEL] - before < 20  # not the 60 asked for
    whole = ndjson_lines(live, "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                                             "options": {"num_predict": 60}, "stream": False})[0]
    assert whole["done_reason"] == "content_filter" and whole["message"]["content"].endswith("[removed]")


def test_a_cut_in_an_openai_stream_is_the_finish_reason(live, filtered):
    filtered(CutAfter(5))
    frames = sse_frames(live, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40})
    assert frames[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert frames[-1]["choices"][0]["text"] == "[removed]"


def test_an_input_filter_refuses_before_anything_is_submitted(live, filtered):
    filtered(Shout(), CutAfter(1000))
    answer = live.client().chat.completions.create(**chat_body("a forbidden question"))
    assert answer.choices[0].finish_reason == "content_filter" and answer.choices[0].message.content == "[removed]"
    assert answer.usage.completion_tokens == 0
    frames = sse_frames(live, "/v1/chat/completions", chat_body("a forbidden question"))
    assert [f["choices"][0]["finish_reason"] for f in frames] == [None, None, "content_filter"]
    assert frames[1]["choices"][0]["delta"] == {"content": "[removed]"}
    lines = ndjson_lines(live, "/api/generate", {"model": MODEL, "prompt": "forbidden"})
    assert lines[-1]["done_reason"] == "content_filter" and lines[0]["response"] == "[removed]"
    final = lines[-1]
    assert final["eval_count"] == 0 and len(final["context"]) == final["prompt_eval_count"]  # nothing generated


class Hold:
    """Holds everything back and gives it at the end, reversed (a filter that must see the whole text)."""

    def check_input(self, prompt: Prompt):
        return None

    def output(self):
        return Hold()

    def push(self, text: str) -> str:
        self.seen = getattr(self, "seen", "") + text
        return ""

    def finish(self) -> str:
        return getattr(self, "seen", "")[::-1]


def test_filters_chain_and_held_text_comes_out_at_the_end():
    from corral.server.generation import through

    first, second = Hold().output(), Shout().output()
    assert through([first, second], "ab", False) == "" and through([first, second], "c", True) == "CBA"
    assert isinstance(through([Shout(), _Counter(2)], "abc", False), Cut)


class CutFirstSample(CutAfter):
    """Cuts the first sample's output at once and lets the others through."""

    def __init__(self):
        super().__init__(10**9)
        self.made = 0

    def output(self):
        self.made += 1
        return _Counter(0 if self.made == 1 else 10**9)


def test_a_cut_stops_only_its_own_sample(live, filtered):
    filtered(CutFirstSample())
    answer = live.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, n=2,
                                              temperature=0.8, seed=1, logit_bias=no_stop(live))
    reasons = sorted(c.finish_reason for c in answer.choices)
    assert reasons == ["content_filter", "length"]
    assert answer.usage.completion_tokens < 40  # the cut sample stopped at once, the other ran its 30
    assert live.wait_idle(10) == 0


def no_stop(server) -> dict:
    return {str(t): -100 for t in server.model().llm.stop_ids}
