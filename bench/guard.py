"""What the guard adds per request: `corral serve` without and with `--guard` (the embedded guard).

    python bench/guard.py                         # 8 requests each, max_tokens 64
    python bench/guard.py --requests 3 --max-tokens 16 --json out.json

The same server is started twice, one after the other (never together: they would share the cores),
on port 0 over the embedded SmolLM2 GGUF. Each run sends the same questions one at a time as streamed
/v1/chat/completions (temperature 0) and records the whole request's latency and the time to the first
content chunk. With --guard the input is assessed before generation and the output is held back per
sentence until the guard has seen it, so the first chunk comes after the first sentence. Then
/v1/moderations is timed on single inputs: the guard's own cost per assessment. Prints both runs, the
ratios and the milliseconds added per request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import QUESTIONS, served_name, start_corral, wait_ready  # noqa: E402


def one_request(client: httpx.Client, base: str, model: str, question: str, max_tokens: int
                ) -> tuple[float, float, int, str]:
    """(latency s, time to first content chunk s, content chunks, finish reason) of one streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens}
    sent, first, chunks, finish = time.perf_counter(), None, 0, ""
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content"):
                chunks += 1
                first = first or time.perf_counter() - sent
            finish = choice.get("finish_reason") or finish
    return time.perf_counter() - sent, first or 0.0, chunks, finish


def run(model: str, guard: bool, requests: int, max_tokens: int) -> dict:
    home = tempfile.mkdtemp(prefix="corral-bench-guard-")
    proc, base = start_corral(model, 1, home, ("--guard",) if guard else ())
    try:
        wait_ready(f"{base}/health", proc)
        name = served_name(base, model)
        with httpx.Client(timeout=600) as client:
            one_request(client, base, name, "Hi", 4)  # load the model (and the guard) before timing
            rows = [one_request(client, base, name, QUESTIONS[i % len(QUESTIONS)], max_tokens)
                    for i in range(requests)]
            moderation = []
            for q in QUESTIONS[:requests]:
                sent = time.perf_counter()
                client.post(f"{base}/v1/moderations", json={"input": q}).raise_for_status()
                moderation.append(time.perf_counter() - sent)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"guard": guard, "latency_s": statistics.mean(r[0] for r in rows),
            "ttft_s": statistics.median(r[1] for r in rows), "chunks": sum(r[2] for r in rows),
            "finish": [r[3] for r in rows], "moderation_ms": 1000 * statistics.median(moderation)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None, help="GGUF to serve (default: the embedded SmolLM2)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    from corral.llm import default_model_path

    model = args.model or str(default_model_path())
    plain, guarded = (run(model, g, args.requests, args.max_tokens) for g in (False, True))
    for r in (plain, guarded):
        print(f"{'--guard' if r['guard'] else 'plain  '}  latency {r['latency_s']:.2f} s/request  first chunk "
              f"{r['ttft_s']:.2f} s  chunks {r['chunks']}  /v1/moderations {r['moderation_ms']:.0f} ms  "
              f"finish {','.join(sorted(set(r['finish'])))}")
    added = guarded["latency_s"] - plain["latency_s"]
    print(f"guard adds {1000 * added:.0f} ms per request ({guarded['latency_s'] / plain['latency_s']:.2f}x latency, "
          f"{guarded['ttft_s'] / max(plain['ttft_s'], 1e-9):.2f}x time to first chunk)")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "guard": guarded, "added_ms": 1000 * added}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
