"""Corral against llama.cpp on a Llama-3.2-1B-shaped model in llama.cpp's own Q4_K_M and Q8_0 files.

    python bench/engine_1b.py [--dir /tmp/corral-1b] [--types Q4_K_M,Q8_0] [--context 4096] [--threads 2]

Setup (bench/kquant_files.py, cached in --dir): random weights built with transformers, converted by
llama.cpp's convert_hf_to_gguf.py, quantized by llama_model_quantize. Each (runtime, file) then runs in
a fresh process after the file was read once (warm page cache): load, peak RSS (VmHWM), prefill of 512
tokens, greedy decode, and decode after `--context` tokens. Prints a table with Corral / llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kquant_files import make_files  # noqa: E402

TAG = "ENGINE_1B "
NEW_TOKENS = 32


def prompt(n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [128000] + [rng.randrange(0, 128000) for _ in range(n - 1)]


def child_corral(path: str, threads: int, context: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import corral
    from corral.engine.sampling import SamplingParams

    started = time.perf_counter()
    llm = corral.load(path, max_seq_len=context + 2 * NEW_TOKENS)
    out = {"load_s": time.perf_counter() - started}
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def run(ids: list[int]) -> tuple[float, float]:
        engine.kept = [[] for _ in engine.kept]  # no prefix reuse
        done = engine.generate([ids], params)[0]
        return len(ids) / done.timings["prefill_s"], (len(done.token_ids) - 1) / done.timings["decode_s"]

    run(prompt(16, 1))  # warm-up
    out["prefill_tok_s"], out["decode_tok_s"] = run(prompt(512))
    _, out["long_decode_tok_s"] = run(prompt(context, 2))
    return out


def child_llamacpp(path: str, threads: int, context: int) -> dict:
    import llama_cpp

    from corral.bench.runtimes import llamacpp_single

    started = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=context + 2 * NEW_TOKENS, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    out = {"load_s": time.perf_counter() - started}

    def run(ids: list[int]) -> tuple[float, float]:
        toks, prefill_s, decode_s = llamacpp_single(llm, ids, NEW_TOKENS)
        return len(ids) / prefill_s, (len(toks) - 1) / decode_s

    run(prompt(16, 1))
    out["prefill_tok_s"], out["decode_tok_s"] = run(prompt(512))
    _, out["long_decode_tok_s"] = run(prompt(context, 2))
    return out


def child_main(runtime: str, path: str, threads: int, context: int) -> int:
    from corral.bench.runtimes import peak_rss_mib

    out = (child_corral if runtime == "corral" else child_llamacpp)(path, threads, context)
    out["peak_rss_mib"] = peak_rss_mib()
    print(TAG + json.dumps(out), flush=True)
    return 0


def measure(runtime: str, path: Path, threads: int, context: int) -> dict:
    with open(path, "rb") as f:  # warm the page cache: load times are for a file read before
        while f.read(1 << 24):
            pass
    proc = subprocess.run([sys.executable, __file__, "--child", runtime, str(path), "--threads", str(threads),
                           "--context", str(context)], capture_output=True, text=True, timeout=3600,
                          env={"OMP_NUM_THREADS": str(threads), **_env()})
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"{runtime} on {path.name} failed:\n{proc.stderr[-2000:]}")


def _env() -> dict:
    import os

    return dict(os.environ)


METRICS = [("load_s", "load s"), ("peak_rss_mib", "peak RSS MiB"), ("prefill_tok_s", "prefill 512 tok/s"),
           ("decode_tok_s", "decode tok/s"), ("long_decode_tok_s", "decode @ctx tok/s")]


def table(results: dict[str, dict[str, dict]], context: int) -> str:
    lines = ["| file | metric | llama.cpp | Corral | Corral / llama.cpp |", "| --- | --- | --- | --- | --- |"]
    for qtype, pair in results.items():
        for key, name in METRICS:
            a, b = pair["llamacpp"][key], pair["corral"][key]
            lines.append(f"| {qtype} | {name.replace('@ctx', f'@{context}')} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/corral-1b"))
    p.add_argument("--types", default="Q4_K_M,Q8_0")
    p.add_argument("--shape", default="1b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("RUNTIME", "PATH"))
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.threads, args.context)
    files = make_files(args.dir, args.shape, args.types.split(","))
    results = {}
    for qtype, path in files.items():
        results[qtype] = {rt: measure(rt, path, args.threads, args.context) for rt in ("llamacpp", "corral")}
        print(json.dumps({qtype: results[qtype]}), flush=True)
    print(table(results, args.context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
