"""Work a client left behind stops, and work that cannot fit is refused before it starts (issue 14 items 6, 7;
RELIABILITY 42): a disconnect during a long prefill or a long embedding, an 8 MB prompt, too many inputs."""

import json
import socket
import time

import pytest

MODEL = "smollm2:135m"
LONG = 3000  # tokens: seconds of prefill on a CPU, so a disconnect after 0.5 s lands inside it


def send_then_hang_up(server, path: str, body: dict, after: float) -> None:
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(after)


def answered(server, route: str, status: int | None = None) -> int:
    """Requests answered on route (the metrics name Ollama's routes without their /api prefix)."""
    return sum(n for (r, s), n in list(server.state.metrics.requests.items())
               if r in (route, route.removeprefix("/api")) and status in (None, s))


def wait_answered(server, route: str, before: int, timeout: float) -> float:
    """Seconds until the server finished one more request on route (fails after timeout)."""
    start = time.time()
    while answered(server, route) == before:
        assert time.time() - start < timeout, f"{route} still running {timeout} s after the client left"
        time.sleep(0.02)
    return time.time() - start


@pytest.fixture(scope="module")
def long_server(corral_home, start_live):
    server = start_live(corral_home, context_length=4096)
    with server.http() as h:
        h.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "options": {"num_predict": 1}, "stream": False})
    yield server
    server.stop()


def long_text(server) -> str:
    tok = server.model().llm.tokenizer
    text = " ".join(f"word{i}" for i in range(LONG))
    ids = tok.encode(text)
    return tok.decode(ids[:LONG])


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_during_prefill_stops_the_prefill(long_server, stream):
    engine = long_server.model().llm.engine
    engine.clear_prefix_cache()
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_text(long_server)}], "max_tokens": 5,
            "stream": stream}
    before = answered(long_server, "/v1/chat/completions")
    send_then_hang_up(long_server, "/v1/chat/completions", body, after=0.5)
    wait_answered(long_server, "/v1/chat/completions", before, timeout=60)
    assert long_server.wait_idle(10) == 0
    # A finished prefill leaves the whole prompt in its slot's prefix cache; a stopped one leaves none of it.
    assert max(len(k) for k in engine.kept) < LONG


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/embeddings", "/api/embed"])
def test_a_client_leaving_an_embedding_stops_it(long_server, route):
    body = {"model": MODEL, "input": long_text(long_server)}
    before = answered(long_server, route, 499)
    all_before = answered(long_server, route)
    send_then_hang_up(long_server, route, body, after=0.5)
    wait_answered(long_server, route, all_before, timeout=60)
    assert answered(long_server, route, 499) == before + 1  # cut short (a finished one would be a 200)
    assert long_server.model().active == 0


def test_too_many_embedding_inputs_are_refused(live):
    with live.http() as h:
        v1 = h.post("/v1/embeddings", json={"model": MODEL, "input": ["x"] * 513})
        ollama = h.post("/api/embed", json={"model": MODEL, "input": ["x"] * 513})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "input" and "at most 512" in v1.text
    assert ollama.status_code == 400 and "at most 512" in ollama.json()["error"]


@pytest.fixture
def counted_encodes(live):
    """Counts the live model's tokenizer calls (the chat format shares the same tokenizer object)."""
    tok = live.model().llm.tokenizer
    calls = []
    real = tok.encode

    def encode(*args, **kwargs):
        calls.append(len(args[0]) if args else 0)
        return real(*args, **kwargs)

    tok.encode = encode
    yield calls
    del tok.encode


def test_a_huge_prompt_is_refused_before_it_is_tokenized(live, counted_encodes):
    """8 MB of text cannot fit 512 tokens: 400 from its length alone, the tokenizer never sees it."""
    huge = "a" * 4_000_000
    with live.http() as h:
        chat = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": huge}]})
        gen = h.post("/api/generate", json={"model": MODEL, "prompt": huge, "stream": False})
        done = h.post("/v1/completions", json={"model": MODEL, "prompt": ["hi", huge]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert gen.status_code == 400 and "characters" in gen.json()["error"]
    assert done.status_code == 400 and done.json()["error"]["param"] == "prompt"
    assert not any(n > 100_000 for n in counted_encodes)
    assert live.model().active == 0
