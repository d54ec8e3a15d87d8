"""RELIABILITY 17-21: API key, Host check, parameter validation, body errors, context limits."""

import json

import httpx
import openai
import pytest

from corral.server.security import bearer_matches, host_allowed, warn_if_exposed
from corral.server.state import ServeConfig

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Hi"}]
OPENAI_KEYS = {"message", "type", "param", "code"}


def post(live, path, body=None, **kwargs) -> httpx.Response:
    with live.http() as h:
        return h.post(path, json=body, **kwargs) if body is not None else h.post(path, **kwargs)


# -- 17: API key and the bind warning ----------------------------------------------------------------

def test_api_key_missing_or_wrong_is_401_in_each_dialect(make_server):
    server = make_server(api_key="sekret")
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert set(info.value.body) == OPENAI_KEYS and info.value.body["code"] == "invalid_api_key"
    with server.http() as h:
        missing = h.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK})
        ollama = h.get("/api/tags")
        health = h.get("/health")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)
    assert health.status_code == 200
    ok = server.client(api_key="sekret").chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bearer_matching_is_exact():
    assert bearer_matches("Bearer k1", "k1") and bearer_matches("bearer k1", "k1")
    assert not bearer_matches("Bearer k12", "k1") and not bearer_matches("k1", "k1") and not bearer_matches(None, "k")


def test_binding_beyond_loopback_without_a_key_warns(capsys):
    warn_if_exposed(ServeConfig(host="0.0.0.0"))
    assert "WITHOUT an API key" in capsys.readouterr().err
    warn_if_exposed(ServeConfig(host="0.0.0.0", api_key="k"))
    warn_if_exposed(ServeConfig(host="127.0.0.1"))
    assert capsys.readouterr().err == ""


# -- 18: DNS rebinding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("localhost:11435", True), ("127.0.0.1", True), ("127.9.9.9:80", True), ("[::1]:8080", True),
    ("LOCALHOST", True), ("evil.example.com", False), ("evil.example.com:11435", False), ("10.0.0.1", False),
    ("localhost.evil.com", False), ("", False)])
def test_host_header_check(host, allowed):
    assert host_allowed(host) is allowed


def test_foreign_host_header_is_403_on_a_loopback_server(live):
    with live.http() as h:
        bad = h.get("/v1/models", headers={"Host": "attacker.example:11435"})
        ollama = h.get("/api/tags", headers={"Host": "attacker.example"})
        good = h.get("/v1/models", headers={"Host": "localhost:1"})
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "host_not_allowed"
    assert ollama.status_code == 403 and isinstance(ollama.json()["error"], str)
    assert good.status_code == 200


# -- 20: every bad parameter named in one 400 -----------------------------------------------------------

def test_bad_parameters_are_all_named_in_one_400_then_the_next_request_succeeds(live):
    raw = json.dumps({"model": MODEL, "messages": ASK, "max_tokens": 0, "top_p": 2, "n": 10**6,
                      "logit_bias": {"999999": 5}, "frequency_penalty": 3})[:-1] + ', "temperature": NaN}'
    r = post(live, "/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and set(err) == OPENAI_KEYS
    for name in ("max_tokens", "temperature", "top_p", "n", "logit_bias", "frequency_penalty"):
        assert name in err["param"] and name in err["message"]
    ok = live.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert ok.usage.completion_tokens == 1


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", "abc"), ("temperature", -1), ("top_p", 0), ("n", 0), ("seed", 1.5),
    ("stop", ["a", "b", "c", "d", "e"]), ("logit_bias", {"x": 1}), ("logit_bias", {"1": 101}),
    ("top_logprobs", 3), ("stream", "yes"), ("tools", [{"type": "function"}]), ("tool_choice", "required"),
    ("response_format", {"type": "xml"}), ("messages", []), ("messages", "hi"), ("model", 7)])
def test_each_bad_parameter_is_a_400_naming_it(live, field, value):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 1, field: value}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["param"]


def test_max_tokens_far_over_the_context_is_a_400_naming_it(live):
    r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 10**12})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"


def test_bad_message_role_is_a_400_naming_messages(live):
    r = post(live, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "wizard" in r.text


# -- 21: malformed bodies, huge bodies, unknown models ----------------------------------------------------

def test_malformed_json_is_a_400_in_each_dialect(live):
    r = post(live, "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    o = post(live, "/api/chat", content=b'{"model": ', headers={"content-type": "application/json"})
    assert o.status_code == 400 and isinstance(o.json()["error"], str)


def test_top_level_array_is_a_400(live):
    r = post(live, "/v1/completions", [{"model": MODEL, "prompt": "x"}])
    assert r.status_code == 400 and "array" in r.json()["error"]["message"]


def test_unknown_model_is_a_404_in_each_dialect(live):
    with pytest.raises(openai.NotFoundError) as info:
        live.client().chat.completions.create(model="no-such-model:7b", messages=ASK)
    assert info.value.body["code"] == "model_not_found" and "no-such-model" in info.value.body["message"]
    o = post(live, "/api/chat", {"model": "no-such-model:7b", "messages": ASK, "stream": False})
    assert o.status_code == 404 and isinstance(o.json()["error"], str)


def test_body_over_the_limit_is_a_413_by_content_length(live):
    body = b'{"model": "x", "prompt": "' + b"a" * (100 << 20) + b'"}'
    with live.http() as h:
        r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        o = h.post("/api/generate", content=body[: 9 << 20], headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert o.status_code == 413 and isinstance(o.json()["error"], str)


def test_chunked_body_over_the_limit_is_a_413(live):
    def chunks():
        yield b'{"model": "x", "prompt": "'
        for _ in range(12):
            yield b"a" * (1 << 20)
        yield b'"}'

    with live.http() as h:
        r = h.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert live.client().models.list().data  # the server is fine afterwards


# -- 19: the context limit -----------------------------------------------------------------------------

def test_prompt_plus_max_tokens_exactly_at_the_context_is_200_and_one_over_is_400(live):
    ctx = live.model().context_length
    prompt = [451] * (ctx - 4)  # token ids used as given
    at = post(live, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    over = post(live, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 5})
    assert at.status_code == 200 and at.json()["usage"]["prompt_tokens"] == ctx - 4
    err = over.json()["error"]
    assert over.status_code == 400 and err["param"] == "max_tokens"
    assert str(ctx) in err["message"] and str(ctx + 1) in err["message"] and "5" in err["message"]


def test_prompt_filling_the_context_is_a_400_naming_the_prompt(live):
    ctx = live.model().context_length
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [451] * ctx})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and str(ctx) in r.text


def test_blob_uploads_stream_past_the_body_limit_while_json_routes_keep_it(make_server):
    import hashlib

    server = make_server(max_body_bytes=4096)
    blob = bytes(range(256)) * 64  # 16 KiB: four times the limit
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with server.http() as h:
        assert h.post(f"/api/blobs/{digest}", content=blob).status_code == 201
        assert h.head(f"/api/blobs/{digest}").status_code == 200
        assert h.post("/api/generate", content=b"{" + b" " * 8192 + b"}").status_code == 413
