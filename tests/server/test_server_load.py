"""RELIABILITY 23, 24, 26, 27, 28: disconnects, engine failures, a full queue, concurrency, a soak."""

import concurrent.futures
import gc
import json
import socket
import threading
import time

import httpx
import psutil
import pytest

MODEL = "smollm2:135m"


def no_stop(server) -> dict:
    """logit_bias that bans every stop token, so a request runs until max_tokens unless cancelled."""
    return {str(t): -100 for t in server.model().llm.stop_ids}


def running_from_metrics(server) -> int:
    with server.http() as h:
        text = h.get("/metrics").text
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("corral_requests_running{"))


def generated(server) -> int:
    return server.state.metrics.generated_tokens.get(MODEL, 0)


def answered(server, route: str) -> int:
    return sum(n for (r, _), n in list(server.state.metrics.requests.items()) if r == route)


def raw_request_then_close(server, path: str, body: dict, wait: float = 0.0) -> None:
    """Send a request on a bare socket, hang up without reading the answer, wait until the server is done with it."""
    before = answered(server, path)
    _send_and_close(server, path, body, wait)
    deadline = time.time() + 20
    while answered(server, path) == before and time.time() < deadline:
        time.sleep(0.02)
    assert answered(server, path) > before, "the server never finished the request"


def _send_and_close(server, path: str, body: dict, wait: float) -> None:
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(wait)


# -- 23: disconnects ---------------------------------------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot(live):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "logit_bias": no_stop(live)}
    before = generated(live)
    with live.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
    assert live.wait_idle(10) == 0 and running_from_metrics(live) == 0
    assert generated(live) - before < 100  # 400 would take ~40 s here; it stopped at the disconnect


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_the_first_token_frees_the_slot(live, stream):
    prompt = [451] * 400  # a long prefill
    before = generated(live)
    raw_request_then_close(live, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 100,
                                                     "stream": stream, "logit_bias": no_stop(live)})
    assert live.wait_idle(10) == 0 and running_from_metrics(live) == 0
    assert generated(live) - before < 100


# -- 24: an engine failure mid-request --------------------------------------------------------------

class FailingModel:
    """Wraps the engine's model: after `after` calls, every forward raises (a simulated device fault)."""

    def __init__(self, model, after: int):
        self.model, self.after, self.calls = model, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("injected engine failure")
        return self.model(*args, **kwargs)


@pytest.fixture
def failing_engine(live):
    engine = live.model().llm.engine
    real = engine.model

    def arm(after: int):
        engine.model = engine.forward_decode = FailingModel(real, after)

    yield arm
    engine.model = engine.forward_decode = real


def test_engine_error_mid_stream_sends_an_error_event_then_done(live, failing_engine):
    failing_engine(after=4)  # prefill + 3 decode steps, then the fault
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 50,
            "stream": True, "logit_bias": no_stop(live)}
    with live.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        frames = [f for f in r.read().decode().split("\n\n") if f]
    assert r.status_code == 200 and frames[-1] == "data: [DONE]"
    error = json.loads(frames[-2].removeprefix("data: "))["error"]
    assert "injected engine failure" in error["message"] and error["type"] == "server_error"
    assert any('"content": "' in f for f in frames[1:-2])  # some tokens came before the failure


def test_engine_error_without_stream_is_a_500_and_the_server_recovers(live, failing_engine):
    failing_engine(after=0)
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5}, timeout=60)
    assert r.status_code == 500 and "injected engine failure" in r.json()["error"]["message"]
    failing_engine(after=10**9)
    ok = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and live.wait_idle(5) == 0


# -- 26: more requests than slots + queue -------------------------------------------------------------

def test_excess_requests_get_503_at_once_and_queued_ones_finish(make_server):
    server = make_server(parallel=1, max_queue=1)
    with server.http() as h:
        h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).raise_for_status()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0,
            "logit_bias": no_stop(server)}
    results = {}

    def run(key):
        results[key] = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    scheduler = server.model().scheduler
    first = threading.Thread(target=run, args=("running",))
    first.start()
    while scheduler.active < 1:
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("queued",))
    second.start()
    while scheduler.active < 2:
        time.sleep(0.01)
    started = time.perf_counter()
    excess = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert excess.status_code == 503 and time.perf_counter() - started < 2
    assert "busy" in excess.json()["error"]["message"] and excess.headers["retry-after"] == "1"
    first.join(120)
    second.join(120)
    for r in results.values():
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


# -- 27: concurrency with cancellations ---------------------------------------------------------------

PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):", "Once upon a time",
           "The best way to learn is", "Water boils at", "My favourite animal is", "In 1969, humans"]


@pytest.mark.slow
def test_32_concurrent_greedy_requests_with_cancellations_match_single_runs(make_server):
    server = make_server(parallel=8, max_queue=32)
    url = server.url + "/v1/completions"

    def body(prompt, stream=False):
        return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}

    single = {p: httpx.post(url, json=body(p), timeout=120).json()["choices"][0]["text"] for p in PROMPTS}

    def survivor(prompt):
        return httpx.post(url, json=body(prompt), timeout=300).json()["choices"][0]["text"]

    def cancelled(prompt):
        with httpx.Client(timeout=300) as h, h.stream("POST", url, json=body(prompt, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return None  # hang up after the first token

    jobs = [(p, i % 4 == 3) for i in range(4) for p in PROMPTS]  # 32 requests, 8 of them cancelled
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [(p, pool.submit(cancelled if cancel else survivor, p)) for p, cancel in jobs]
        outputs = [(p, f.result()) for p, f in futures]
    for prompt, text in outputs:
        if text is not None:
            assert text == single[prompt], prompt
    assert server.wait_idle(10) == 0


# -- 28: a soak of mixed requests with loads and unloads ------------------------------------------------

@pytest.mark.slow
def test_soak_mixed_requests_with_model_swaps_returns_to_baseline(make_server, corral_home):
    from corral.store import Store

    Store(corral_home).copy(MODEL, "smol-copy:latest")
    server = make_server(max_loaded=1)
    proc = psutil.Process()

    def cycle():
        codes = []
        with server.http() as h:
            for model in (MODEL, "smol-copy:latest"):  # each request evicts the other model
                codes.append(("valid", h.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).status_code))
                codes.append(("invalid", h.post("/v1/chat/completions", json={
                    "model": model, "messages": [], "temperature": -1}).status_code))
            codes.append(("invalid", h.post("/v1/completions", content=b"{oops").status_code))
            codes.append(("invalid", h.post("/v1/completions", json={"model": "ghost", "prompt": "x"}).status_code))
            codes.append(("valid", h.post("/v1/completions", json={
                "model": MODEL, "prompt": "Hi", "max_tokens": 2, "keep_alive": 0}).status_code))
            codes.append(("valid", h.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]}).status_code))
        return codes

    cycle()  # warm up: first loads, allocator pools, lazily imported modules
    gc.collect()
    fds, rss = proc.num_fds(), proc.memory_info().rss
    for _ in range(4):
        for kind, code in cycle():
            assert code < 500, (kind, code)
            assert (code == 200) == (kind == "valid"), (kind, code)
    gc.collect()
    assert server.wait_idle(10) == 0
    assert proc.num_fds() <= fds + 4
    assert proc.memory_info().rss <= rss + 300 * 2**20, (rss >> 20, proc.memory_info().rss >> 20)
    assert server.state.pool.loads >= 12
