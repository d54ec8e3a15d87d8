"""Concurrent streaming clients against `corral serve` and llama-cpp-python's OpenAI server.

    python bench/serve.py                       # the embedded SmolLM2 GGUF, 1/4/8 clients, 2 rounds
    python bench/serve.py --clients 1,8 --rounds 3 --max-tokens 128 --json out.json

Each server runs alone (one after the other, never together: they would share the 2 cores), on
127.0.0.1 and port 0 (the port it bound is read back), over the same GGUF file. For each client
count N, N clients start together and each streams one /v1/chat/completions request (temperature 0, a different question
each, max_tokens fixed). Reported per server and N: aggregate tokens/s (content chunks of all
clients / wall time from the first request sent to the last stream closed) and the p50 / p99
time to first token; then Corral's ratios. Chunks are counted as tokens because both servers
stream one chunk per token (Corral holds a chunk back only while a UTF-8 character or a stop
string is incomplete, which these English prompts do not hit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe a walk through a busy market in Marrakech.",
    "What are the main causes of the seasons on Earth? Explain in detail.",
    "Write a letter to a friend about learning to play the piano.",
    "Explain the difference between weather and climate with examples.",
    "Tell me about the history of the bicycle.",
    "Describe how bread is made, from wheat field to bakery.",
]


@dataclass
class Round:
    clients: int
    wall_s: float
    tokens: int
    ttft_s: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def listening_port(proc: subprocess.Popen, timeout: float = 300) -> int:
    """The port a server started with --port 0 bound (its LISTEN socket, through psutil): no port is picked
    here and released, so another process cannot take it in between."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening")
        ports = [c.laddr.port for c in psutil.Process(proc.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN]
        if ports:
            return ports[0]
        time.sleep(0.2)
    raise RuntimeError(f"the server did not listen within {timeout:.0f} s")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def start_corral(model: str, parallel: int, home: str, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """corral serve on port 0 (more flags in `extra`): (process, base URL) once it reports the port it bound."""
    env = dict(os.environ, CORRAL_HOME=home)
    port_file = Path(home) / "port"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port", "0", "--port-file",
           str(port_file), "--parallel", str(parallel), "--model", model, *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not port_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("corral serve did not report its port")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


def start_llamacpp(model: str, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
           "--interrupt_requests", "False"]  # its default cuts a running stream when the next request comes
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def one_client(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int,
                     sent: float) -> tuple[int, float | None]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens}
    chunks, first = 0, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - sent
    return chunks, first


async def run_round(base: str, model: str, clients: int, max_tokens: int) -> Round:
    url = f"{base}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        sent = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens,
                                                    sent) for i in range(clients)), return_exceptions=True)
        wall = time.perf_counter() - sent
    ok = [r for r in results if not isinstance(r, BaseException)]
    for r in results:
        if isinstance(r, BaseException):
            print(f"  client error: {r}", file=sys.stderr)
    return Round(clients, wall, sum(c for c, _ in ok), [t for _, t in ok if t is not None], len(results) - len(ok))


def bench_server(name: str, proc: subprocess.Popen, base: str, model: str, counts: list[int], rounds: int,
                 max_tokens: int) -> dict[int, list[Round]]:
    out: dict[int, list[Round]] = {}
    try:
        wait_ready(f"{base}/v1/models", proc)
        model = served_name(base, model)
        asyncio.run(run_round(base, model, 1, 8))  # warm-up: first-request costs are not the server's steady state
        for n in counts:
            out[n] = []
            for r in range(rounds):
                result = asyncio.run(run_round(base, model, n, max_tokens))
                out[n].append(result)
                print(f"{name:9s} clients={n} round={r + 1}: {result.tok_s:6.1f} tok/s aggregate, "
                      f"{result.tokens} tokens in {result.wall_s:.1f} s, errors {result.errors}", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def served_name(base: str, path: str) -> str:
    """The id a server lists for the GGUF it was started with (Corral names it after the file)."""
    ids = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json().get("data", [])]
    stem = os.path.basename(path).removesuffix(".gguf").lower()
    return next((i for i in ids if stem in i.lower() or i == path), ids[0] if ids else path)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: dict[str, dict[int, list[Round]]]) -> list[dict]:
    rows = []
    for server, by_n in results.items():
        for n, rounds in by_n.items():
            ttft = [t for r in rounds for t in r.ttft_s]
            rows.append({"server": server, "clients": n, "tok_s": statistics.median(r.tok_s for r in rounds),
                         "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
                         "errors": sum(r.errors for r in rounds)})
    return rows


def print_table(rows: list[dict]) -> None:
    by = {(r["server"], r["clients"]): r for r in rows}
    print("| server | clients | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) | vs own 1 client | vs llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        single = by.get((r["server"], 1))
        anchor = by.get(("llamacpp", r["clients"]))
        own = f"{r['tok_s'] / single['tok_s']:.2f}x" if single and single["tok_s"] else "-"
        vs = f"{r['tok_s'] / anchor['tok_s']:.2f}x" if anchor and anchor["tok_s"] and r["server"] != "llamacpp" else "-"
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} "
              f"| {own} | {vs} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", default="1,4,8", help="comma-separated client counts (default 1,4,8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per client count; the median is shown")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--servers", default="corral,llamacpp")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (Corral uses torch's default)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.model is None:
        from corral.llm import default_model_path
        args.model = str(default_model_path())
    counts = [int(c) for c in args.clients.split(",")]
    results: dict[str, dict[int, list[Round]]] = {}
    for server in args.servers.split(","):
        if server == "corral":
            with tempfile.TemporaryDirectory() as home:
                proc, base = start_corral(args.model, max(counts), home)
                results[server] = bench_server(server, proc, base, args.model, counts, args.rounds, args.max_tokens)
        elif server == "llamacpp":
            proc = start_llamacpp(args.model, 0, args.threads)
            base = f"http://127.0.0.1:{listening_port(proc)}"
            results[server] = bench_server(server, proc, base, args.model, counts, args.rounds, args.max_tokens)
        else:
            parser.error(f"unknown server {server!r}")
    rows = summarize(results)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": {s: {n: [asdict(r) for r in rs] for n, rs in by.items()}
                                                 for s, by in results.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
