"""Live servers for the HTTP tests: uvicorn in a background thread on a free 127.0.0.1 port, with the
embedded SmolLM2 registered in a temporary CORRAL_HOME. One shared server for the session; tests
that need other settings (API key, tiny queue) start their own with `make_server`."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

MODEL = "smollm2:135m"


@dataclass
class LiveServer:
    url: str
    state: object
    server: object
    thread: threading.Thread

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def model(self):
        return self.state.pool.find(MODEL)

    def running(self) -> int:
        pool = self.state.pool
        return sum(m.scheduler.running + m.scheduler.queued for m in pool.loaded() + pool.draining())

    def wait_idle(self, timeout: float = 10.0) -> int:
        """Requests still running or queued after waiting up to timeout seconds for them to reach 0."""
        deadline = time.time() + timeout
        while self.running() and time.time() < deadline:
            time.sleep(0.02)
        return self.running()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# The routers the shared server includes (server.app.ROUTERS names; default: all of them).
ROUTERS = tuple(r for r in os.environ.get("CORRAL_TEST_ROUTERS", "openai,responses,ollama,web").split(",") if r)


def start_server(home, **overrides) -> LiveServer:
    import uvicorn

    from corral.server.app import build_app
    from corral.server.connections import uvicorn_config
    from corral.server.state import ServeConfig, ServerState
    from corral.store import Store

    config = ServeConfig(host="127.0.0.1", parallel=4, max_queue=8, context_length=512, keep_alive=-1)
    for key, value in overrides.items():
        setattr(config, key, value)
    state = ServerState.create(config, Store(home))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.port = port
    server = uvicorn.Server(uvicorn_config(build_app(state, ROUTERS), config, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", state, server, thread)


@pytest.fixture(scope="session")
def start_live():
    """start_server for fixtures of other scopes (`from conftest import` would find whichever conftest
    module pytest imported first: tests/web has one too)."""
    return start_server


@pytest.fixture(scope="session")
def corral_home(tmp_path_factory):
    """A store with the embedded model registered once for the whole session."""
    from corral.store import Store
    from corral.store.load import ensure_default

    home = tmp_path_factory.mktemp("corral_home")
    old = os.environ.get("CORRAL_HOME")
    os.environ["CORRAL_HOME"] = str(home)
    ensure_default(Store(home))
    yield home
    if old is None:
        os.environ.pop("CORRAL_HOME", None)
    else:
        os.environ["CORRAL_HOME"] = old


@pytest.fixture(scope="session")
def live(corral_home):
    server = start_server(corral_home)
    try:
        with server.http() as h:  # load the model once, so the first test does not pay for it
            h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).raise_for_status()
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_server(corral_home):
    started = []

    def make(**overrides) -> LiveServer:
        server = start_server(corral_home, **overrides)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
