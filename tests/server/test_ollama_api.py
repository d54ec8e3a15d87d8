"""The Ollama dialect through the official `ollama` client (and raw httpx where the wire shape matters),
against the shared live server with SmolLM2 (tests/server/conftest.py)."""

import json
import time

import httpx
import jsonschema
import ollama
import pytest

MODEL = "smollm2:135m"
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 16}
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def wait_idle(server, timeout: float = 10.0) -> int:
    """Requests still running or queued after waiting up to timeout seconds for them to reach 0."""
    deadline = time.time() + timeout
    while server.running() and time.time() < deadline:
        time.sleep(0.02)
    return server.running()


def client(live) -> ollama.Client:
    return ollama.Client(host=live.url, timeout=120)


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def assert_final_stats(r) -> None:
    assert r.done is True and r.done_reason in ("stop", "length")
    assert all(isinstance(r[k], int) and r[k] > 0 for k in DURATIONS)
    assert r.prompt_eval_count > 0 and r.eval_count > 0
    assert r.total_duration >= r.prompt_eval_duration


# -- generate and chat ---------------------------------------------------------------------------------
def test_generate_stream_joins_to_the_non_streamed_text_with_durations(live):
    c = client(live)
    whole = c.generate(model=MODEL, prompt="Write a poem about the sea.", options=GREEDY)
    parts = list(c.generate(model=MODEL, prompt="Write a poem about the sea.", options=GREEDY, stream=True))
    assert whole.response and "".join(p.response for p in parts) == whole.response
    assert all(p.done is False for p in parts[:-1]) and parts[-1].response == ""
    for final in (whole, parts[-1]):
        assert_final_stats(final)
        assert final.done_reason == "length" and final.eval_count == 16
        assert final.context[: final.prompt_eval_count] and len(final.context) == final.prompt_eval_count + 16


def test_generate_stream_is_ndjson_by_default(live):
    with live.http() as h, h.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "Hi",
                                                                  "options": {"num_predict": 3}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r)
    assert len(lines) >= 2 and lines[-1]["done"] is True and set(lines[0]) >= {"model", "created_at", "response"}


def test_chat_stream_joins_to_the_non_streamed_message(live):
    c = client(live)
    messages = [{"role": "user", "content": "Name the capital of France."}]
    whole = c.chat(model=MODEL, messages=messages, options=GREEDY)
    parts = list(c.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert whole.message.role == "assistant" and "Paris" in whole.message.content
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert_final_stats(whole)
    assert_final_stats(parts[-1])


def test_context_from_a_reply_continues_the_conversation(live):
    c = client(live)
    short = {**GREEDY, "num_predict": 4}
    first = c.generate(model=MODEL, prompt="My name is Ada.", options=short)
    second = c.generate(model=MODEL, prompt="What is my name?", context=first.context, options=short)
    alone = c.generate(model=MODEL, prompt="What is my name?", options=short)
    assert second.prompt_eval_count > len(first.context) and second.prompt_eval_count > alone.prompt_eval_count


def test_raw_prompt_is_tokenized_as_given(live):
    r = client(live).generate(model=MODEL, prompt="The sky is", raw=True, options=GREEDY)
    assert r.prompt_eval_count == len(live.model().llm.tokenizer.encode("The sky is"))


def test_stop_option_ends_with_stop(live):
    r = client(live).generate(model=MODEL, prompt="Count from 1 to 20, separated by commas.",
                              options={"temperature": 0, "num_predict": 60, "stop": ["5"]})
    assert r.done_reason == "stop" and "5" not in r.response


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}]
CALL_SCHEMA = {"type": "object", "properties": {"name": {"enum": ["get_weather"]},
                                                "arguments": TOOLS[0]["function"]["parameters"]},
               "required": ["name", "arguments"]}


def test_tool_call_round_trip_with_arguments_as_an_object(live):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = {"model": MODEL, "messages": messages, "tools": TOOLS, "format": CALL_SCHEMA, "stream": False,
            "options": {"temperature": 0, "num_predict": 60}}
    with live.http() as h:
        raw = h.post("/api/chat", json=body).json()
        streamed = [x for x in ndjson(h.post("/api/chat", json={**body, "stream": True})) if not x["done"]]
    call = raw["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"], dict) and call["arguments"]["city"]
    assert [x["message"]["tool_calls"] for x in streamed if x["message"].get("tool_calls")] == \
        [raw["message"]["tool_calls"]]
    follow = messages + [raw["message"], {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21 C"}]
    answer = client(live).chat(model=MODEL, messages=follow, tools=TOOLS, options={"temperature": 0,
                                                                                  "num_predict": 24})
    assert answer.done and answer.message.role == "assistant" and answer.eval_count > 0


def test_format_json_and_a_schema_give_valid_json(live):
    c = client(live)
    any_json = c.generate(model=MODEL, prompt='Give a JSON object with keys "name" and "color" for a cat.',
                          format="json", options={"temperature": 0, "num_predict": 60})
    assert any_json.done_reason == "stop" and isinstance(json.loads(any_json.response), dict | list)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer"},
                                               "mood": {"enum": ["calm", "playful"]}},
              "required": ["name", "age", "mood"], "additionalProperties": False}
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "Invent a cat."}], format=schema,
               options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(r.message.content), schema)


def test_suffix_on_a_model_without_fim_tokens_is_a_400_saying_so(live):
    with pytest.raises(ollama.ResponseError) as e:
        client(live).generate(model=MODEL, prompt="def f(", suffix="    return x", options=GREEDY)
    assert e.value.status_code == 400 and "does not support insert" in e.value.error


# -- options ---------------------------------------------------------------------------------------------
def test_bad_options_are_one_400_naming_each_then_the_next_request_succeeds(live):
    bad = {"temperature": "hot", "top_p": 2, "num_predict": 0, "mirostat": 2, "frobnicate": 1, "stop": 5}
    with pytest.raises(ollama.ResponseError) as e:
        client(live).generate(model=MODEL, prompt="Hi", options=bad)
    assert e.value.status_code == 400
    for name in bad:
        assert name in e.value.error
    ok = client(live).generate(model=MODEL, prompt="Hi", options={**GREEDY, "num_predict": 2})
    assert ok.done and ok.eval_count == 2


def test_ignored_and_switched_off_options_are_accepted(live):
    options = {**GREEDY, "num_predict": 2, "repeat_last_n": 64, "num_thread": 2, "num_gpu": 0, "use_mmap": True,
               "mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "repeat_penalty": 1.1}
    r = client(live).generate(model=MODEL, prompt="Hi", options=options)
    assert r.done and r.eval_count == 2


def test_num_ctx_above_the_model_is_a_400_and_below_limits_the_answer(live):
    c = client(live)
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model=MODEL, prompt="Hi", options={"num_ctx": 10**6})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    r = c.generate(model=MODEL, prompt="Write a long story about a dragon.", options={"temperature": 0,
                                                                                     "num_ctx": 48})
    assert r.done_reason == "length" and r.prompt_eval_count + r.eval_count == 48
    prompt = c.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}).prompt_eval_count
    exact = c.generate(model=MODEL, prompt="Hi", options={"num_ctx": prompt + 5, "num_predict": 5})
    assert exact.done and exact.eval_count <= 5
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model=MODEL, prompt="Hi", options={"num_ctx": prompt + 5, "num_predict": 6})
    assert e.value.status_code == 400 and "num_predict" in e.value.error and str(prompt + 6) in e.value.error


# -- errors ---------------------------------------------------------------------------------------------
def test_unknown_model_is_a_404_with_an_error_string(live):
    with live.http() as h:
        for path, body in (("/api/generate", {"prompt": "Hi"}), ("/api/chat", {"messages": [{"role": "user",
                                                                                            "content": "Hi"}]}),
                           ("/api/show", {}), ("/api/embed", {"input": "Hi"})):
            r = h.post(path, json={"model": "no-such-model:1b", **body})
            assert r.status_code == 404 and list(r.json()) == ["error"] and "no-such-model" in r.json()["error"]


def test_malformed_bodies_and_images_are_400s(live):
    with live.http() as h:
        assert h.post("/api/generate", content=b"{nope").status_code == 400
        assert h.post("/api/chat", json=[1, 2]).status_code == 400
        r = h.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "images": ["aGk="]})
        assert r.status_code == 400 and "images" in r.json()["error"]


def test_engine_error_mid_stream_is_a_final_error_line(live, monkeypatch):
    engine = live.model().llm.engine
    real_step, calls = engine.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("boom in the engine")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": MODEL, "prompt": "Tell me a story.", "options": {"temperature": 0, "num_predict": 50}}
    with live.http() as h:
        lines = ndjson(h.post("/api/generate", json=body))
        calls["n"] = 0
        whole = h.post("/api/generate", json={**body, "stream": False})
    assert lines[0]["done"] is False and lines[0]["response"]
    assert list(lines[-1]) == ["error"] and "boom in the engine" in lines[-1]["error"]
    assert whole.status_code == 500 and "boom in the engine" in whole.json()["error"]
    monkeypatch.undo()
    assert client(live).generate(model=MODEL, prompt="Hi", options={"num_predict": 2}).done


def test_client_disconnect_mid_stream_or_while_waiting_frees_the_slot(live):
    body = {"model": MODEL, "prompt": "Write a very long essay.", "options": {"num_predict": 400}}
    with live.http() as h, h.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        for _ in zip(range(3), r.iter_lines()):
            pass
        assert live.running() == 1
    assert wait_idle(live) == 0
    with live.http(timeout=1.0) as h, pytest.raises(httpx.ReadTimeout):
        h.post("/api/generate", json={"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7,", "raw": True,
                                      "stream": False, "options": {"temperature": 0, "num_predict": 400}})
    assert wait_idle(live) == 0


# -- models ---------------------------------------------------------------------------------------------
def test_list_show_copy_and_delete(live):
    c = client(live)
    assert MODEL in [m.model for m in c.list().models]
    shown = c.show(MODEL)
    assert shown.modelfile.startswith("FROM ") and shown.details.format == "gguf"
    assert shown.modelinfo["llama.context_length"] == 8192 and shown.modelinfo["tokenizer.ggml.tokens"] is None
    assert "im_start" in shown.template
    assert c.copy(MODEL, "smol-copy:1").status == "success"
    assert "smol-copy:1" in [m.model for m in c.list().models]
    assert c.delete("smol-copy:1").status == "success"
    assert "smol-copy:1" not in [m.model for m in c.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("smol-copy:1")
    assert e.value.status_code == 404


def test_create_from_a_stored_model_sets_system_and_parameters(live):
    c = client(live)
    statuses = [p.status for p in c.create(model="smol-terse", from_=MODEL, system="Answer in one word.",
                                           parameters={"num_predict": 3, "temperature": 0, "stop": ["\n\n"]},
                                           stream=True)]
    assert statuses[0] == "parsing request" and statuses[-1] == "success"
    try:
        shown = c.show("smol-terse")
        assert "Answer in one word." in shown.modelfile and "num_predict" in shown.parameters
        r = c.generate(model="smol-terse", prompt="Name a fruit.", keep_alive=0)
        assert r.eval_count <= 3
    finally:
        c.delete("smol-terse")


def test_create_refuses_paths_and_bad_parameters(live, tmp_path):
    with live.http() as h:
        r = h.post("/api/create", json={"model": "x", "from": str(tmp_path), "stream": False})
        assert r.status_code == 400 and "not a model name" in r.json()["error"]
        r = h.post("/api/create", json={"model": "x", "modelfile": "FROM /etc/passwd", "stream": False})
        assert r.status_code == 400
        r = h.post("/api/create", json={"model": "x", "from": MODEL, "parameters": {"frobnicate": 1},
                                        "stream": False})
        assert r.status_code == 400 and "frobnicate" in r.json()["error"]
        r = h.post("/api/create", json={"model": "x", "from": "missing-model", "stream": False})
        assert r.status_code == 404
    assert "x:latest" not in [m.model for m in client(live).list().models]


def test_keep_alive_0_unloads_and_an_empty_prompt_loads(live):
    c = client(live)
    c.copy(MODEL, "smol-ka")
    try:
        loaded = c.generate(model="smol-ka", prompt="", keep_alive="5m")
        assert loaded.done_reason == "load"
        [entry] = [m for m in c.ps().models if m.model == "smol-ka:latest"]
        assert entry.expires_at is not None and entry.size > 0
        assert entry.context_length == live.state.config.context_length
        r = c.generate(model="smol-ka", prompt="Hi", keep_alive=0, options={"num_predict": 2})
        assert r.done
        assert "smol-ka:latest" not in [m.model for m in c.ps().models]
        assert c.generate(model="smol-ka", prompt="", keep_alive=0).done_reason == "unload"
    finally:
        c.delete("smol-ka")


def test_ps_shows_the_loaded_model(live):
    [entry] = [m for m in client(live).ps().models if m.model == MODEL]
    assert entry.size_vram == 0 and entry.details.family == "llama" and len(entry.digest) == 64


def test_embed_with_minilm_and_with_the_llm(live):
    c = client(live)
    r = c.embed(model="all-minilm", input=["a cat", "a dog", "stock markets"])
    vectors = r.embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-4
    dot = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
    assert dot[0] > dot[1]  # cat is nearer dog than stock markets
    llm = c.embed(model=MODEL, input="Hello", dimensions=64)
    assert len(llm.embeddings) == 1 and len(llm.embeddings[0]) == 64 and llm.prompt_eval_count > 0
    assert len(c.embeddings(model=MODEL, prompt="Hello").embedding) == 576
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="all-minilm", input="word " * 400, truncate=False)
    assert e.value.status_code == 400 and "truncate" in e.value.error


def test_version(live):
    with live.http() as h:
        assert isinstance(h.get("/api/version").json()["version"], str)


def test_a_slow_client_does_not_hold_other_requests(live):
    """Two streams at once share the batch; both finish."""
    c = client(live)
    started = time.perf_counter()
    a = c.generate(model=MODEL, prompt="One", options={"num_predict": 8}, stream=True)
    b = c.generate(model=MODEL, prompt="Two", options={"num_predict": 8}, stream=True)
    next(a)
    assert list(b)[-1].done and list(a)[-1].done
    assert time.perf_counter() - started < 60
