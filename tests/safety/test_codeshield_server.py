"""`corral serve --code-shield`: a real server (embedded SmolLM2) whose answer is replaced, before Code
Shield sees it, by a scripted reply with an insecure code block (the 135M model does not write one on
demand). Read as raw SSE / NDJSON bytes, and through the official openai client."""

from __future__ import annotations

import json

import pytest
from safety_live import live_server

from corral.server.codeshield import CodeShieldFilter
from corral.server.commands import config_from_args

MODEL = "smollm2:135m"
CODE = "os.system('ping ' + host)"
REPLY = f"Here is a script:\n\n```python\nimport os\n{CODE}\n```\n\nRun it as root.\n"


class ScriptedReply:
    """Stands in for the model's words: each piece the model streams becomes the next piece of REPLY,
    and whatever is left comes at the end. It runs before Code Shield, as a model's text would."""

    def check_input(self, prompt):
        return None

    def output(self):
        return _Script()


class _Script:
    def __init__(self):
        self.left = REPLY

    def push(self, text: str) -> str:
        piece, self.left = self.left[:7], self.left[7:]
        return piece

    def finish(self) -> str:
        rest, self.left = self.left, ""
        return rest


@pytest.fixture(scope="module")
def shielded(tmp_path_factory):
    """A live server started as with --code-shield block, the script put in front of its Code Shield filter."""
    with live_server(tmp_path_factory.mktemp("codeshield_home"), code_shield="block") as server:
        assert [type(f).__name__ for f in server.state.filters] == ["CodeShieldFilter"]
        server.state.filters.insert(0, ScriptedReply())
        yield server


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a ping script."}], "max_tokens": 8,
        "temperature": 0}


def test_flag_sets_mode():
    from corral.cli import build_parser

    parse = build_parser().parse_args
    assert config_from_args(parse(["serve", "--code-shield"])).code_shield == "block"
    assert config_from_args(parse(["serve", "--code-shield", "warn"])).code_shield == "warn"
    assert config_from_args(parse(["serve"])).code_shield is None


@pytest.mark.slow
def test_openai_stream_raw_bytes_never_carry_blocked_code(shielded):
    with shielded.http() as h, h.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        raw = b"".join(r.iter_bytes())
    assert r.status_code == 200 and CODE.encode() not in raw and b"import os" not in raw
    frames = [json.loads(x[6:]) for x in raw.decode().split("\n\n") if x.startswith("data: {")]
    text = "".join(f["choices"][0]["delta"].get("content", "") for f in frames if f["choices"])
    assert text.startswith("Here is a script:") and "Code Shield withheld a code block" in text
    last = [f for f in frames if f["choices"] and f["choices"][0]["finish_reason"]][-1]["choices"][0]
    assert last["code_shield"]["blocked"] == 1
    assert [(f["rule"], f["cwe"], f["line"]) for f in last["code_shield"]["findings"]] == [
        ("python-os-command", "CWE-78", 5)]


@pytest.mark.slow
def test_ollama_chat_ndjson_raw_bytes_never_carry_blocked_code(shielded):
    body = {"model": MODEL, "messages": CHAT["messages"], "options": {"num_predict": 8, "temperature": 0}}
    with shielded.http() as h, h.stream("POST", "/api/chat", json=body) as r:
        raw = b"".join(r.iter_bytes())
    assert r.status_code == 200 and CODE.encode() not in raw
    lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    assert lines[-1]["done"] is True and lines[-1]["code_shield"]["blocked"] == 1
    assert "Code Shield withheld" in "".join(x["message"]["content"] for x in lines)


@pytest.mark.slow
def test_openai_client_sees_notice_and_findings(shielded):
    client = shielded.client()
    reply = client.chat.completions.create(**CHAT)
    choice = reply.choices[0]
    assert CODE not in choice.message.content and "Code Shield withheld" in choice.message.content
    assert choice.model_extra["code_shield"]["findings"][0]["severity"] == "error"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**CHAT, stream=True)
                       if c.choices)
    assert streamed == choice.message.content


@pytest.mark.slow
def test_warn_mode_passes_code_and_appends_warning(shielded):
    block = shielded.state.filters[1]
    shielded.state.filters[1] = CodeShieldFilter("warn")  # as --code-shield warn would have set it
    try:
        answers = _three_dialects(shielded)
    finally:
        shielded.state.filters[1] = block
    for text, report in answers:
        assert CODE in text and "Code Shield warning" in text
        assert report["mode"] == "warn" and report["blocked"] == 0 and report["findings"][0]["cwe"] == "CWE-78"


def _three_dialects(server) -> list[tuple[str, dict]]:
    with server.http() as h:
        chat = h.post("/v1/chat/completions", json=CHAT).json()
        gen = h.post("/api/generate", json={"model": MODEL, "prompt": "ping", "stream": False,
                                            "options": {"num_predict": 8}}).json()
        done = h.post("/v1/completions", json={"model": MODEL, "prompt": "ping", "max_tokens": 8}).json()
    return [(chat["choices"][0]["message"]["content"], chat["choices"][0]["code_shield"]),
            (gen["response"], gen["code_shield"]), (done["choices"][0]["text"], done["choices"][0]["code_shield"])]
