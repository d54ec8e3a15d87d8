"""The guard in the serving path: unsafe output is cut before it reaches the client (raw SSE and NDJSON
bytes), unsafe input is refused before anything is generated, and a failing guard fails closed.

The model is the real embedded SmolLM2 answering at temperature 0; the guard is a real guard object whose
verdict the test controls: it flags any message containing a word taken from the second sentence of the
model's own plain answer (so the cut must land exactly between the first and second sentences)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from corral.safety.guard import Assessment
from corral.safety.taxonomy import LLAMA_GUARD_3, Policy
from corral.server.moderation import SENTENCE_END, GuardFilter

MODEL = "smollm2:135m"
PROMPT = "Write three short sentences about dogs."
CUT_TEXT = "[removed by the guard: S1 Violent Crimes]"


class WordGuard:
    """Flags (S1) any assessed message containing `word`; remembers what it was shown."""

    name = "word-guard"
    policy = Policy(LLAMA_GUARD_3)

    def __init__(self, word: str | None):
        self.word, self.seen = word, []

    def assess(self, conversation):
        text = conversation[-1]["content"]
        self.seen.append((conversation[-1]["role"], text))
        flagged = self.word is not None and self.word in text
        return Assessment(flagged, ("S1",) if flagged else (), float(flagged), {"S1": float(flagged)})


def _server_conftest():
    spec = importlib.util.spec_from_file_location("server_conftest", Path(__file__).parents[1] / "server" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    module.ROUTERS = ("openai", "ollama", "moderation")
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    from corral.store import Store
    from corral.store.load import ensure_default

    home = tmp_path_factory.mktemp("guard_home")
    old = os.environ.get("CORRAL_HOME")
    os.environ["CORRAL_HOME"] = str(home)
    ensure_default(Store(home))
    live = _server_conftest().start_server(home)
    with live.http(timeout=600) as h:  # load the model once (slow on a busy machine), not inside a test
        h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).raise_for_status()
    yield live
    live.stop()
    if old is None:
        os.environ.pop("CORRAL_HOME", None)
    else:
        os.environ["CORRAL_HOME"] = old


@pytest.fixture
def guarded(server):
    def install(guard, **kw):
        server.state.filters[:] = [GuardFilter(guard, **kw)]
        return guard

    yield install
    server.state.filters[:] = []
    assert server.wait_idle(10) == 0


def chat(content=PROMPT, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 48, "temperature": 0,
            **extra}


def first_two_sentences(server) -> tuple[str, str]:
    """The plain answer's first sentence (with its trailing space) and a word only its second one has."""
    with server.http() as h:
        text = h.post("/v1/chat/completions", json=chat()).json()["choices"][0]["message"]["content"]
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    assert len(ends) >= 2, text
    first, second = text[:ends[0]], text[ends[0]:ends[1]]
    words = [w for w in re.findall(r"[A-Za-z]{4,}", second) if w not in first]
    assert words, (first, second)
    return first, max(words, key=len)


def test_unsafe_sentence_mid_answer_never_reaches_an_openai_stream(server, guarded):
    first, word = first_two_sentences(server)
    guard = guarded(WordGuard(word))
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        raw = r.read().decode()
    assert word not in raw.replace(CUT_TEXT, "")
    frames = [json.loads(f.removeprefix("data: ")) for f in raw.split("\n\n") if f and f != "data: [DONE]"]
    shown = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])
    assert shown == first + CUT_TEXT  # the first sentence whole, then the cut; nothing of the second
    assert [f["choices"][0]["finish_reason"] for f in frames if f["choices"]][-1] == "content_filter"
    assert ("user", PROMPT) in guard.seen and any(role == "assistant" for role, _ in guard.seen)


def test_unsafe_sentence_mid_answer_never_reaches_an_ollama_stream(server, guarded):
    import ollama

    first, word = first_two_sentences(server)
    guarded(WordGuard(word))
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "options": {"temperature": 0, "num_predict": 48}}
    with server.http() as h, h.stream("POST", "/api/chat", json=body) as r:
        raw = r.read().decode()
    lines = [json.loads(x) for x in raw.splitlines() if x]
    assert word not in raw.replace(CUT_TEXT, "")
    assert "".join(x["message"]["content"] for x in lines) == first + CUT_TEXT
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "content_filter"
    client = ollama.Client(host=server.url)
    answer = client.chat(model=MODEL, messages=body["messages"], options=body["options"])
    assert answer.done_reason == "content_filter" and answer.message.content == first + CUT_TEXT


def test_unsafe_input_is_refused_before_generation(server, guarded):
    guarded(WordGuard("forbidden"))
    before = server.state.metrics.generated_tokens.get(MODEL, 0)
    answer = server.client().chat.completions.create(**chat("a forbidden question"))
    assert answer.choices[0].finish_reason == "content_filter" and answer.choices[0].message.content == CUT_TEXT
    # a made-up history is checked too: the flagged text is an earlier user turn
    history = [{"role": "user", "content": "forbidden"}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "go on"}]
    with server.http() as h:
        lines = [json.loads(x) for x in h.post("/api/chat", json={"model": MODEL, "messages": history}).text.splitlines()]
    assert lines[-1]["done_reason"] == "content_filter" and lines[0]["message"]["content"] == CUT_TEXT
    assert server.state.metrics.generated_tokens.get(MODEL, 0) == before


class BrokenGuard(WordGuard):
    def assess(self, conversation):
        from corral.errors import GuardVerdictError

        raise GuardVerdictError("guard answer is not 'safe' or 'unsafe': 'maybe'", text="maybe")


def test_a_failing_guard_fails_closed_unless_told_to_fail_open(server, guarded):
    guarded(BrokenGuard(None))
    answer = server.client().chat.completions.create(**chat())
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.choices[0].message.content == "[removed: the guard failed (GuardVerdictError)]"
    guarded(BrokenGuard(None), fail_open=True)
    answer = server.client().chat.completions.create(**chat(max_tokens=8))
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content


def test_long_output_without_sentence_ends_is_checked_in_bounded_pieces(server, guarded):
    guard = guarded(WordGuard(None))
    body = {"model": MODEL, "prompt": "1 2 3 4 5 6 7 8 9 10 11 12 13", "max_tokens": 200, "temperature": 0}
    with server.http() as h:
        text = h.post("/v1/completions", json=body).json()["choices"][0]["text"]
    seen = "".join(t for role, t in guard.seen if role == "assistant")
    assert text and all(len(t) <= 2 * 300 + 64 for _, t in guard.seen)
    assert text in seen or seen.endswith(text[-20:])


def test_moderations_through_the_openai_client(server):
    import openai

    server.state.guard = WordGuard("bomb")
    try:
        client = server.client()
        result = client.moderations.create(input=["how do I build a bomb", "how do I bake bread"])
        flagged, clean = result.results
        assert result.model == "word-guard" and result.id.startswith("modr-")
        assert flagged.flagged and flagged.categories.violence and not flagged.categories.sexual
        assert flagged.categories.model_extra["S1"] is True and flagged.category_scores.violence == 1.0
        assert not clean.flagged and not clean.categories.violence and clean.category_scores.violence == 0.0
        one = client.moderations.create(input="a bomb").results
        assert len(one) == 1 and one[0].flagged
        with pytest.raises(openai.BadRequestError, match="input"):
            client.moderations.create(input=[])
    finally:
        server.state.guard = None
