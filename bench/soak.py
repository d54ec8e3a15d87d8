"""Soak `corral serve`: every route at once, with disconnects, slow readers and invalid requests.

    python bench/soak.py --minutes 30            # the issue 14 "Must show" run
    python bench/soak.py --minutes 0.2 --workers 3 --json soak.json

Starts `corral serve` on 127.0.0.1 port 0 (it reports the port it bound) with a fresh CORRAL_HOME
holding the embedded SmolLM2, and runs --workers clients until --minutes (or --requests) run out. Each
client picks an action at random: OpenAI chat/completions (streamed or not, or with a body uploaded
slowly), embeddings (the model and MiniLM), Ollama generate/chat/embed/tags/show/ps/create/copy/delete,
the chat page's conversations, model loads and unloads through keep_alive, and invalid requests (bad
JSON, wrong types, out-of-range values, unknown models). A streamed answer is sometimes dropped mid-way
(a disconnect) or read slowly.

The checks (RELIABILITY.md 28; exit 1 if one fails):
  * no 5xx (and no transport error) on a valid request; no 5xx on an invalid one either (items 8-12, 43);
  * corral_requests_running and corral_requests_queued back to 0 (/metrics) once the clients stop;
  * open descriptors of the server (/proc/PID/fd) back to the count after warm-up, within --fd-slack;
  * resident memory (/proc/PID/status VmRSS, sampled every 5 s) at the end within --rss-slack-mb of the
    highest sample of the run's first quarter (by then the mix has loaded every model it loads).
Loopback only: the server binds 127.0.0.1 and nothing else is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "smollm2:135m"
EMBEDDER = "all-minilm"
FAST = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Say hi.", "Name a colour.", "Count to five.", "What is 2+2?", "Give one word for happy."]


@dataclass
class Tally:
    by_status: Counter = field(default_factory=Counter)
    """(kind, route, status) -> count; kind is "valid" or "invalid", status an int or "transport"."""
    disconnects: int = 0
    slow_reads: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, valid: bool, route: str, status: int | str, note: str = "") -> None:
        kind = "valid" if valid else "invalid"
        route = re.sub(r"/[0-9a-f]{32}(?=/|$)", "/{id}", route)  # one row per route, not per conversation
        self.by_status[(kind, route, status)] += 1
        if (status == "transport" or (isinstance(status, int) and status >= 500)) and len(self.failures) < 200:
            self.failures.append(f"{kind} {route} -> {status} {note[:200]}")

    def count(self, kind: str, bad) -> int:
        return sum(n for (k, _, s), n in self.by_status.items() if k == kind and bad(s))


def is_5xx(status) -> bool:
    return isinstance(status, int) and status >= 500


# -- the server ------------------------------------------------------------------------------------
def start_server(home: Path, args) -> tuple[subprocess.Popen, str]:
    port_file = home / "port"
    log = open(home / "serve.log", "w")
    env = {**os.environ, "CORRAL_HOME": str(home)}
    for key in ("CORRAL_HOST", "CORRAL_API_KEY"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port", "0", "--port-file",
           str(port_file), "--parallel", str(args.parallel), "--max-loaded", "2", "--context", "1024",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not port_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"corral serve did not start:\n{(home / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{int(port_file.read_text())}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("corral serve never answered /health")
        time.sleep(0.2)


def process_sample(pid: int) -> tuple[int, int]:
    """(RSS bytes, open descriptors) of the server process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def running_and_queued(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("corral_requests_running", "corral_requests_queued")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# -- actions: each sends one request (or a short sequence) and records what came back -----------------
async def send(client, tally: Tally, valid: bool, method: str, route: str, **kwargs) -> httpx.Response | None:
    try:
        response = await client.request(method, route, **kwargs)
    except httpx.HTTPError as exc:
        tally.record(valid, route, "transport", repr(exc))
        return None
    tally.record(valid, route, response.status_code, response.text)
    return response


async def stream(client, tally: Tally, rng: random.Random, route: str, body: dict) -> None:
    """A streamed answer read to the end, dropped after a few chunks, or read slowly."""
    style = rng.choice(["full", "full", "drop", "slow"])
    try:
        async with client.stream("POST", route, json=body) as response:
            chunks = 0
            async for _ in response.aiter_lines():
                chunks += 1
                if style == "drop" and chunks >= rng.randint(1, 4):
                    tally.disconnects += 1
                    break  # leaving the block closes the connection mid-answer
                if style == "slow":
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
            tally.slow_reads += style == "slow"
            tally.record(True, route, response.status_code, "" if response.status_code < 500 else "stream")
    except httpx.HTTPError as exc:
        tally.record(True, route, "transport", repr(exc))


def _messages(rng) -> list[dict]:
    return [{"role": "user", "content": rng.choice(PROMPTS)}]


async def openai_chat(client, tally, rng):
    body = {"model": MODEL, "messages": _messages(rng), **FAST}
    if rng.random() < 0.5:
        await stream(client, tally, rng, "/v1/chat/completions", {**body, "stream": True})
    else:
        await send(client, tally, True, "POST", "/v1/chat/completions", json=body)


async def openai_completion(client, tally, rng):
    body = {"model": MODEL, "prompt": rng.choice(PROMPTS), **FAST}
    if rng.random() < 0.5:
        await stream(client, tally, rng, "/v1/completions", {**body, "stream": True})
    else:
        await send(client, tally, True, "POST", "/v1/completions", json=body)


async def openai_embeddings(client, tally, rng):
    model = rng.choice([MODEL, EMBEDDER])
    await send(client, tally, True, "POST", "/v1/embeddings", json={"model": model, "input": rng.sample(PROMPTS, 2)})


async def ollama_generate(client, tally, rng):
    body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "options": {"temperature": 0, "num_predict": 12}}
    if rng.random() < 0.5:
        await stream(client, tally, rng, "/api/generate", body)
    else:
        await send(client, tally, True, "POST", "/api/generate", json={**body, "stream": False})


async def ollama_chat(client, tally, rng):
    body = {"model": MODEL, "messages": _messages(rng), "options": {"temperature": 0, "num_predict": 12}}
    if rng.random() < 0.5:
        await stream(client, tally, rng, "/api/chat", body)
    else:
        await send(client, tally, True, "POST", "/api/chat", json={**body, "stream": False})


async def ollama_embed(client, tally, rng):
    await send(client, tally, True, "POST", "/api/embed", json={"model": MODEL, "input": rng.choice(PROMPTS)})


async def ollama_info(client, tally, rng):
    await send(client, tally, True, "GET", "/api/tags")
    await send(client, tally, True, "POST", "/api/show", json={"model": MODEL})
    await send(client, tally, True, "GET", "/api/ps")
    await send(client, tally, True, "GET", "/v1/models")


async def ollama_models(client, tally, rng):
    """create FROM the stored model, copy it, generate with the copy (a second model loads), delete both."""
    name, copy = f"soak-{rng.randrange(1 << 30):x}", f"soak-copy-{rng.randrange(1 << 30):x}"
    created = await send(client, tally, True, "POST", "/api/create",
                         json={"model": name, "from": MODEL, "system": "Be brief.", "stream": False})
    if created is None or created.status_code != 200:
        return
    await send(client, tally, True, "POST", "/api/copy", json={"source": name, "destination": copy})
    await send(client, tally, True, "POST", "/api/generate",
               json={"model": copy, "prompt": "Hi", "stream": False, "keep_alive": rng.choice([0, "2s"]),
                     "options": {"num_predict": 4}})
    for model in (copy, name):
        await send(client, tally, True, "DELETE", "/api/delete", json={"model": model})


async def slow_sender(client, tally, rng):
    """A client that uploads its request body in pieces, pausing under the server's body timeout."""
    body = json.dumps({"model": MODEL, "messages": _messages(rng), **FAST}).encode()
    cuts = sorted(rng.sample(range(1, len(body)), 3))

    async def pieces():
        for begin, end in zip([0, *cuts], [*cuts, len(body)]):
            yield body[begin:end]
            await asyncio.sleep(rng.uniform(0.2, 1.5))

    await send(client, tally, True, "POST", "/v1/chat/completions", content=pieces(),
               headers={"Content-Type": "application/json"})


async def keep_alive_churn(client, tally, rng):
    """Ollama's load (empty prompt) and unload (keep_alive 0) of the default model."""
    keep_alive = rng.choice([0, "1s", "5m"])
    await send(client, tally, True, "POST", "/api/generate", json={"model": MODEL, "keep_alive": keep_alive})


async def conversations(client, tally, rng):
    base = "/corral/api/conversations"
    made = await send(client, tally, True, "POST", base, json={"title": "soak", "model": MODEL})
    if made is None or made.status_code != 200:
        return
    conv = made.json()["id"]
    await send(client, tally, True, "POST", f"{base}/{conv}/messages", json={"role": "user", "content": "hi"})
    await send(client, tally, True, "PATCH", f"{base}/{conv}", json={"title": "soak renamed"})
    await send(client, tally, True, "GET", f"{base}/{conv}")
    await send(client, tally, True, "GET", base)
    await send(client, tally, True, "GET", "/corral/api/export", params={"id": conv})
    await send(client, tally, True, "DELETE", f"{base}/{conv}")


INVALID = [
    ("POST", "/v1/chat/completions", {"content": b"{not json"}),
    ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": "hi"}}),
    ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                               "max_tokens": -1}}),
    ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                               "temperature": "hot"}}),
    ("POST", "/v1/chat/completions", {"json": {"model": "no-such-model", "messages": []}}),
    ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                               "seed": 2**64}}),
    ("POST", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "max_tokens": 10**12}}),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": []}}),
    ("POST", "/api/generate", {"json": {"model": MODEL, "prompt": 5}}),
    ("POST", "/api/chat", {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}}),
    ("POST", "/api/chat", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                    "tools": [5]}}),
    ("POST", "/api/embed", {"json": {"model": 5, "input": "x"}}),
    ("POST", "/api/show", {"json": {"model": "../../etc/passwd"}}),
    ("POST", "/api/create", {"json": {"model": "x", "from": "/etc", "stream": False}}),
    ("POST", "/api/copy", {"json": {"source": "no-such-model", "destination": "x"}}),
    ("DELETE", "/api/delete", {"json": {"model": "no-such-model"}}),
    ("POST", "/corral/api/conversations", {"json": {"title": 5}}),
    ("POST", "/corral/api/conversations", {"content": "[" * 10_000 + "]" * 10_000}),
    ("GET", "/corral/api/conversations/no-such-id", {}),
    ("POST", "/corral/api/import", {"content": b'{"format": "other"}'}),
]


async def invalid(client, tally, rng):
    method, route, kwargs = rng.choice(INVALID)
    headers = {"Content-Type": "application/json"} if "content" in kwargs else {}
    await send(client, tally, False, method, route, headers=headers, **kwargs)


ACTIONS = [(openai_chat, 4), (openai_completion, 3), (openai_embeddings, 2), (ollama_generate, 3), (ollama_chat, 3),
           (ollama_embed, 2), (ollama_info, 2), (ollama_models, 1), (keep_alive_churn, 1), (conversations, 2),
           (slow_sender, 1), (invalid, 5)]


# -- the run ---------------------------------------------------------------------------------------
async def client_loop(url: str, tally: Tally, rng: random.Random, stop_at: float, budget: list[int],
                      first: list, server: subprocess.Popen) -> None:
    """`first` (this client's share of every action, so a short run still covers them all), then random picks.
    A server that died ends the run (its exit code is in the report)."""
    actions, weights = zip(*ACTIONS)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < stop_at and budget[0] > 0 and server.poll() is None:
            budget[0] -= 1
            action = first.pop(0) if first else rng.choices(actions, weights)[0]
            await action(client, tally, rng)


async def settle(url: str, timeout: float = 120) -> int:
    """Running + queued requests after waiting up to timeout seconds for them to reach 0 (-1: /metrics
    never answered)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline, left = time.monotonic() + timeout, -1
        while time.monotonic() < deadline:
            try:
                left = await running_and_queued(client)
            except httpx.HTTPError:
                left = -1  # a loaded machine: ask again
            if left == 0:
                break
            await asyncio.sleep(0.5)
        return left


async def soak(url: str, server: subprocess.Popen, args) -> dict:
    pid = server.pid
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:  # warm-up: both models loaded once
        warm = Tally()
        await openai_chat(client, warm, random.Random(0))
        await openai_embeddings(client, warm, random.Random(1))
        await openai_embeddings(client, warm, random.Random(2))
    start = process_sample(pid)
    tally, budget, samples = Tally(), [args.requests], []
    began = time.monotonic()
    stop_at = began + args.minutes * 60
    sampler = asyncio.create_task(sample_every(pid, 5.0, samples, began))
    shares = [[action for action, _ in ACTIONS[i::args.workers]] for i in range(args.workers)]
    await asyncio.gather(*(client_loop(url, tally, random.Random(args.seed + i), stop_at, budget, shares[i], server)
                           for i in range(args.workers)))
    sampler.cancel()
    left = await settle(url) if server.poll() is None else -1
    await asyncio.sleep(2)  # closed client connections leave the server's descriptor table
    end = process_sample(pid) if server.poll() is None else start  # a dead server has nothing left to measure
    # Every model the mix loads has been loaded once by the end of the first quarter: RSS past that is growth.
    early = [rss for t, rss in samples if t <= max(args.minutes * 15, 5.0)] or [start[0]]
    return report(tally, (max(early), start[1]), end, left, args) | {
        "rss_mib_every_5s": [round(rss / (1 << 20)) for _, rss in samples]}


async def sample_every(pid: int, seconds: float, out: list, began: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(OSError):  # the server died: the report says so
            out.append((time.monotonic() - began, process_sample(pid)[0]))


def report(tally: Tally, start, end, left: int, args) -> dict:
    mib = 1 << 20
    checks = {
        "valid_5xx": (tally.count("valid", is_5xx), 0),
        "valid_transport_errors": (tally.count("valid", lambda s: s == "transport"), 0),
        "invalid_5xx": (tally.count("invalid", is_5xx), 0),
        "running_plus_queued_at_end": (left if left >= 0 else 10**9, 0),
        "open_fds_growth": (end[1] - start[1], args.fd_slack),
        "rss_growth_mib": (round((end[0] - start[0]) / mib, 1), args.rss_slack_mb),
    }
    failed = [name for name, (value, limit) in checks.items() if value > limit]
    return {"requests": sum(tally.by_status.values()), "disconnects": tally.disconnects,
            "slow_reads": tally.slow_reads, "rss_mib": [round(start[0] / mib, 1), round(end[0] / mib, 1)],
            "open_fds": [start[1], end[1]], "checks": {k: {"value": v, "limit": lim} for k, (v, lim) in checks.items()},
            "failed": failed, "failures": tally.failures[:50],
            "statuses": {f"{k} {r} {s}": n for (k, r, s), n in sorted(tally.by_status.items(), key=str)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the clients run (default: 30)")
    parser.add_argument("--requests", type=int, default=10**9, help="stop after this many actions as well")
    parser.add_argument("--workers", type=int, default=6, help="concurrent clients (default: 6)")
    parser.add_argument("--parallel", type=int, default=4, help="the server's --parallel (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fd-slack", type=int, default=8, help="descriptors the server may end with beyond warm-up")
    parser.add_argument("--rss-slack-mb", type=float, default=256.0, help="RSS growth allowed over the run (MiB)")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--log", help="keep the server's whole log here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as home:
        proc, url = start_server(Path(home), args)
        try:
            result = asyncio.run(soak(url, proc, args))
        except Exception as exc:  # noqa: BLE001 -- still report, with the server log, and fail
            result = {"failed": ["crashed"], "error": repr(exc)}
        finally:
            died = proc.poll()  # None while it still runs: a crash shows here (a negative code is a signal)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result_log = (Path(home) / "serve.log").read_text()
            if args.log:
                Path(args.log).write_text(result_log)
    result["server_log_tail"] = result_log.splitlines()[-20:]
    if died is not None:
        result["server_exit_code"] = died
        result["failed"] = [*result["failed"], "server_died"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"soak: {'FAILED ' + ', '.join(result['failed']) if result['failed'] else 'all checks passed'}",
          file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
