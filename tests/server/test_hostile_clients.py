"""Issue 14, what a hostile client found at the door: cross-site requests (item 1, RELIABILITY 38), Host
parsing (item 5, RELIABILITY 18), slow and half-sent requests (item 4, RELIABILITY 41) and Ollama's
health check (item 16)."""

import logging
import socket
import threading
import time

import pytest

from corral.server.connections import RepeatFilter
from corral.server.security import host_allowed, origin_allowed

MODEL = "smollm2:135m"
EVIL = "http://attacker.example"


def _own_origin(live) -> str:
    return live.url  # http://127.0.0.1:<port>, what the chat page's fetches send


# -- item 1: cross-site request forgery ------------------------------------------------------------------

def test_a_pages_no_cors_text_plain_post_from_another_origin_is_refused(live):
    """Issue 14 item 1: a page on another site posts JSON as text/plain (no preflight needed) to copy a
    model and to import a conversation: both are 403 and nothing is created."""
    copy = b'{"source": "smollm2:135m", "destination": "stolen:latest"}'
    with live.http() as h:
        copied = h.post("/api/copy", content=copy, headers={"Origin": EVIL, "Content-Type": "text/plain"})
        imported = h.post("/corral/api/import", content=b'{"format": "corral-webui"}',
                          headers={"Origin": EVIL, "Content-Type": "text/plain"})
        tags = h.get("/api/tags").json()["models"]
    assert copied.status_code == 403 and "Origin" in copied.json()["error"]
    assert imported.status_code == 403
    assert "access-control-allow-origin" not in copied.headers
    assert not any(m["name"].startswith("stolen") for m in tags)


def test_json_routes_refuse_text_plain_even_from_the_same_origin_and_curl_keeps_working(live):
    """Issue 14 item 1: text/plain and multipart bodies are 415 on JSON routes; a request without Origin (curl,
    SDKs) and the page's own same-origin application/json requests pass; curl's default form type too."""
    body = b'{"model": "smollm2:135m", "prompt": "Hi", "max_tokens": 1}'
    with live.http() as h:
        plain = h.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"})
        multipart = h.post("/api/show", content=b'{"model": "x"}', headers={"Content-Type": "multipart/form-data"})
        own = h.post("/v1/completions", content=body,
                     headers={"Origin": _own_origin(live), "Content-Type": "application/json"})
        sdk = h.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        curl = h.post("/v1/completions", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        form_from_page = h.post("/v1/completions", content=body, headers={
            "Origin": _own_origin(live), "Content-Type": "application/x-www-form-urlencoded"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    assert multipart.status_code == 415
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == _own_origin(live)
    assert sdk.status_code == 200 and curl.status_code == 200
    assert form_from_page.status_code == 415


def test_cors_preflight_is_answered_for_allowed_origins_only(make_server):
    """Issue 14 item 1: OPTIONS (405 before) answers an allowed origin's preflight with its CORS headers and
    refuses any other; --allow-origin patterns take "*" wildcards."""
    server = make_server(allow_origins=["http://localhost:*"])
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"}
    with server.http() as h:
        allowed = h.options("/api/chat", headers={"Origin": "http://localhost:3000", **ask})
        own = h.options("/v1/chat/completions", headers={"Origin": server.url, **ask})
        refused = h.options("/api/chat", headers={"Origin": EVIL, **ask})
        chat = h.post("/api/show", json={"model": MODEL}, headers={"Origin": "http://localhost:3000"})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    assert own.status_code == 204
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert chat.status_code == 200 and chat.headers["access-control-allow-origin"] == "http://localhost:3000"


@pytest.mark.parametrize("origin, host, allowed", [
    ("http://127.0.0.1:11435", "127.0.0.1:11435", True), ("http://LOCALHOST:8080", "localhost:8080", True),
    ("http://example.com", "example.com:80", True), ("https://example.com", "example.com", True),
    ("http://127.0.0.1:11436", "127.0.0.1:11435", False), ("http://evil.com", "127.0.0.1:11435", False),
    ("null", "127.0.0.1:11435", False), ("file://", "127.0.0.1:11435", False),
    ("http://127.0.0.1:11435@evil.com", "127.0.0.1:11435", False)])
def test_origin_matching(origin, host, allowed):
    """Issue 14 item 1: the same host and port as Host (default ports filled in), nothing else by default."""
    assert origin_allowed(origin, host, []) is allowed


def test_origin_patterns():
    """Issue 14 item 1: --allow-origin / CORRAL_ORIGINS entries match whole origins, "*" as a wildcard."""
    assert origin_allowed("http://localhost:5173", "127.0.0.1:1", ["http://localhost:*"])
    assert not origin_allowed("http://localhost.evil.com", "127.0.0.1:1", ["http://localhost:*"])
    assert origin_allowed("https://anything.example", None, ["*"])


# -- item 5: Host parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["[::1].evil.com", "127.0.0.1:11700@evil.com", "[::1]x", "127.0.0.1:", "[::1]:1:2",
                                  "127.0.0.1:99999", "localhost evil.com", "[127.0.0.1]"])
def test_host_header_tricks_are_not_loopback(host):
    """Issue 14 item 5: a Host that only starts like a loopback name is not one."""
    assert host_allowed(host) is False


def test_host_header_tricks_are_403_on_the_server(live):
    """Issue 14 item 5: the two Host values the tester got through are refused over HTTP."""
    with live.http() as h:
        answers = [h.get("/api/tags", headers={"Host": host})
                   for host in ("[::1].evil.com", "127.0.0.1:11700@evil.com")]
    assert [r.status_code for r in answers] == [403, 403]


# -- item 16: Ollama's health check ---------------------------------------------------------------------------

def test_root_answers_ollama_is_running_to_tools_and_the_page_to_browsers(live):
    """Issue 14 item 16: HEAD / and GET / from a tool answer 200 "Ollama is running" (text/plain), as Ollama
    does; a browser (Accept: text/html) still gets the chat page."""
    with live.http() as h:
        head = h.head("/")
        tool = h.get("/", headers={"Accept": "*/*"})
        browser = h.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert head.status_code == 200
    assert tool.status_code == 200 and tool.text == "Ollama is running"
    assert tool.headers["content-type"].startswith("text/plain")
    assert browser.status_code == 200 and "<html" in browser.text.lower()


# -- item 2: user templates ---------------------------------------------------------------------------------

NESTED_LOOPS = "{% for i in range(50000) %}{% for j in range(50000) %}{% endfor %}{% endfor %}x"
DOUBLING = "{% set ns = namespace(s='ab') %}{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"


def test_a_runaway_request_template_stops_at_its_budget_and_health_answers_meanwhile(live, monkeypatch):
    """Issue 14 item 2: an Ollama `template` with nested range(50000) loops froze every route for 75 s; now it
    renders in a worker thread, /health answers promptly while it runs, and it ends as a 400 at the budget."""
    from corral.tokenizer import template

    monkeypatch.setattr(template, "RENDER_SECONDS", 2.0)
    answer = {}

    def generate() -> None:
        with live.http() as h:
            answer["r"] = h.post("/api/generate", json={"model": MODEL, "prompt": "hi", "template": NESTED_LOOPS,
                                                         "stream": False, "options": {"num_predict": 1}})

    thread = threading.Thread(target=generate)
    thread.start()
    waits = []
    with live.http(timeout=10) as h:
        time.sleep(0.3)
        while thread.is_alive():
            started = time.perf_counter()
            assert h.get("/health").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.1)
    thread.join()
    assert answer["r"].status_code == 400 and "budget" in answer["r"].json()["error"]
    assert len(waits) >= 5 and max(waits) < 1.0, waits


def test_create_refuses_a_template_that_fails_a_trial_render(live):
    """Issue 14 item 2: /api/create (and a Modelfile TEMPLATE) with a doubling template is a 400; nothing stored."""
    with live.http() as h:
        made = h.post("/api/create", json={"model": "runaway:latest", "from": MODEL, "template": DOUBLING,
                                           "stream": False})
        old = h.post("/api/create", json={"model": "runaway2:latest", "stream": False,
                                          "modelfile": f'FROM {MODEL}\nTEMPLATE """{DOUBLING}"""\n'})
        names = [m["name"] for m in h.get("/api/tags").json()["models"]]
    assert made.status_code == 400 and "budget" in made.json()["error"]
    assert old.status_code == 400 and "budget" in old.json()["error"]
    assert "runaway:latest" not in names and "runaway2:latest" not in names


# -- item 4: slow and half-sent requests ---------------------------------------------------------------------

def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes; RESET when it closed with our late bytes unread (a TCP reset)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"RESET"
    return b"".join(chunks)


@pytest.fixture
def strict(make_server):
    return make_server(header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0)


def test_slow_loris_connections_are_closed_and_health_keeps_answering(strict):
    """Issue 14 item 4: 200 idle connections and 20 that send their headers a byte at a time do not stop
    /health; each is answered 408 and closed once the header deadline passes."""
    idle = [_connect(strict.url) for _ in range(200)]
    slow = [_connect(strict.url) for _ in range(20)]
    stop = threading.Event()

    def dribble() -> None:
        for i in range(100):
            for s in slow:
                try:
                    s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n"[i:i + 1] or b"X")
                except OSError:
                    pass
            if stop.wait(0.05):
                return

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        with strict.http(timeout=10) as h:
            assert all(h.get("/health").status_code == 200 for _ in range(5))
        for s in idle:  # each answered and closed after its 1 s header deadline
            assert _read_all(s).startswith(b"HTTP/1.1 408")
        for s in slow:  # closed too; a dribbler may see a reset as its next byte meets the closed socket
            answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 408") or answer == b"RESET"
    finally:
        stop.set()
        thread.join()
        for s in idle + slow:
            s.close()


def test_a_body_shorter_than_its_content_length_times_out(strict):
    """Issue 14 item 4: Content-Length 100 and 10 bytes sent: 408 and a closed connection, not a wait forever."""
    s = _connect(strict.url)
    started = time.monotonic()
    s.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": ")
    answer = _read_all(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 15
    with strict.http() as h:
        assert h.get("/health").status_code == 200


def test_connections_over_the_cap_get_503_and_are_closed(make_server):
    """Issue 14 item 4: past max_connections a new connection is answered 503 and closed at once, so a flood
    cannot use up the descriptors; a connection freed makes room again."""
    server = make_server(max_connections=5)
    held = [_connect(server.url) for _ in range(5)]
    time.sleep(0.3)
    extra = _connect(server.url)
    assert _read_all(extra).startswith(b"HTTP/1.1 503")
    for s in held:
        s.close()
    time.sleep(0.3)
    with server.http() as h:
        assert h.get("/health").status_code == 200


def test_repeated_log_lines_are_rate_limited():
    """Issue 14 item 4: a message logged 100,000 times in a burst passes a handful of times, and the next one
    after the window says how many were dropped."""
    records = []
    logger = logging.getLogger("corral.test.flood")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    now = [0.0]
    flood = RepeatFilter(burst=5, window=10.0, clock=lambda: now[0])
    logger.addFilter(flood)
    try:
        for i in range(100_000):
            logger.error("socket.accept() out of system resource (%d)", i)
        now[0] = 11.0
        logger.error("socket.accept() out of system resource (%d)", -1)
    finally:
        logger.removeFilter(flood)
        logger.removeHandler(handler)
    assert len(records) == 6
    assert "99995 similar lines dropped" in records[-1].getMessage()


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(make_server):
    """A handler's unexpected exception answers a JSON 500, and the client's next request on the same
    keep-alive connection is served (uvicorn closed it after Starlette re-raised: a reset on a valid request)."""
    server = make_server()

    async def boom():
        raise RuntimeError("internal detail /home/someone")

    server.server.config.app.router.add_api_route("/test-boom", boom, methods=["GET"])
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        reader = sock.makefile("rb")
        for path, status in (("/test-boom", b"500"), ("/health", b"200")):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = reader.readline()
            assert status in head, head
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = reader.read(length)
            assert b"/home/someone" not in body
