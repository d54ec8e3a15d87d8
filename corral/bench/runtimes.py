"""The child side of `corral bench`: one runtime (Corral, llama.cpp or transformers) in a fresh process.

`corral.bench.harness` (the parent) starts `python -m corral.bench.runtimes` once per (runtime,
variant), writes a BenchSpec as JSON on stdin and reads one tagged ChildResult line from stdout,
so each child's load time and peak RSS are its own. Only the standard library is imported at
module level (and `import corral` does not import torch), so llama.cpp's RSS carries no torch and
Corral's import time is measured inside the child.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_TAG = "CORRAL_BENCH_RESULT "


@dataclass
class BenchSpec:
    """What the parent sends to one child, as JSON on stdin."""

    runtime: str
    variant: str
    """Corral's quantization ("none", "int8", "int4", "gguf"); "" for the other runtimes."""
    model_path: str
    prompt: list[int]
    batch_prompts: list[list[int]]
    new_tokens: int = 128
    runs: int = 3
    threads: int = 2
    compile: bool = False
    hf_dir: str | None = None
    """transformers only: an HF directory holding the GGUF's weights dequantized to fp32."""


@dataclass
class ChildResult:
    """What one child sends back: per-run lists, so the parent takes the medians."""

    runtime: str
    variant: str = ""
    import_s: float = 0.0
    load_s: float = 0.0
    peak_rss_mib: float = 0.0
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    batch_tok_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None


# ---- one runtime in this process ---------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's own peak resident memory.

    On Linux it is VmHWM from /proc/self/status, the high-water mark of this program's address space.
    getrusage's ru_maxrss is not: Linux carries it over fork and exec, so a child started by a parent
    holding 850 MiB reported at least 850 MiB whatever it used (every earlier row had that floor).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_child(spec: BenchSpec) -> ChildResult:
    """Run one runtime in this process; the caller is a fresh child, so RSS and load time are its own."""
    runner = {"corral": run_corral, "llamacpp": run_llamacpp, "transformers": run_transformers}[spec.runtime]
    result = ChildResult(runtime=spec.runtime, variant=spec.variant)
    try:
        runner(spec, result)
    except Exception as exc:  # a runtime that fails becomes an error row, not a crashed benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    result.peak_rss_mib = peak_rss_mib()
    return result


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def _import_torch(spec: BenchSpec, result: ChildResult):
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec.threads)
    result.import_s = time.perf_counter() - started
    result.versions["torch"] = torch.__version__
    return torch


def run_corral(spec: BenchSpec, result: ChildResult) -> None:
    _import_torch(spec, result)
    started = time.perf_counter()
    import corral
    from corral.engine.sampling import SamplingParams

    result.import_s += time.perf_counter() - started
    kwargs: dict[str, Any] = {"quant": spec.variant}  # "none" widens the GGUF to float32
    if spec.compile:
        kwargs["compile"] = True
    if len(spec.batch_prompts) > 8:  # the engine's default batch size
        kwargs["max_batch_size"] = len(spec.batch_prompts)
    llm, result.load_s = timed(corral.load, spec.model_path, **kwargs)
    engine = llm.engine
    params = {n: SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (4, spec.new_tokens)}

    def step(prompts: list[list[int]], n: int) -> tuple[float, float, int]:
        # Forget cached prefixes: every run must prefill its whole prompt, as the other runtimes do.
        clear = getattr(engine, "clear_prefix_cache", None)
        if clear is not None:
            clear()
        else:
            engine.kept = [[] for _ in engine.kept]
        completions = engine.generate(prompts, params[n])
        first = completions[0].timings
        if first.get("reused_prefix", 0):
            raise RuntimeError(f"prefix cache reused {first['reused_prefix']} tokens; prefill figure invalid")
        return first["prefill_s"], first["decode_s"], sum(len(c.token_ids) for c in completions)

    _measure(spec, result, step)


def _measure(spec: BenchSpec, result: ChildResult, step) -> None:
    """step(prompts, n) -> (prefill_s, decode_s of the first prompt, tokens generated over all prompts)."""
    step([spec.batch_prompts[0][:8]], 4)  # warm-up: first-call allocations and any lazy compilation
    for _ in range(spec.runs):
        prefill_s, decode_s, n = step([spec.prompt], spec.new_tokens)
        result.prefill_tok_s.append(len(spec.prompt) / prefill_s)
        result.decode_tok_s.append((n - 1) / decode_s)
        (_, _, total), wall = timed(step, spec.batch_prompts, spec.new_tokens)
        result.batch_tok_s.append(total / wall)


def run_llamacpp(spec: BenchSpec, result: ChildResult) -> None:
    started = time.perf_counter()
    import llama_cpp

    result.import_s = time.perf_counter() - started
    result.versions["llama_cpp"] = llama_cpp.__version__
    llm, result.load_s = timed(llama_cpp.Llama, spec.model_path, n_threads=spec.threads,
                                n_threads_batch=spec.threads, n_ctx=2048, n_batch=512, verbose=False, logits_all=False)
    ctx = llamacpp_context(llm, len(spec.batch_prompts), spec.threads)

    def step(prompts: list[list[int]], n: int) -> tuple[float, float, int]:
        if len(prompts) == 1:
            out, prefill_s, decode_s = llamacpp_single(llm, prompts[0], n)
            return prefill_s, decode_s, len(out)
        return 0.0, 0.0, sum(map(len, llamacpp_batched(llm, ctx, prompts, n)))

    result.notes.append("batch: one llama_batch, a seq_id per prompt (C API)")
    _measure(spec, result, step)


def _argmax(llm, ctx, row: int) -> int:
    """Greedy pick from the logits of batch row `row` (-1: the last) of a llama.cpp context."""
    import llama_cpp
    import numpy as np

    logits = llama_cpp.llama_get_logits_ith(ctx, row)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


def llamacpp_single(llm, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Greedy batch-1 generation with the high-level Llama object: (tokens, prefill_s, decode_s)."""
    llm.reset()
    _, prefill_s = timed(llm.eval, prompt)
    started = time.perf_counter()
    out = [_argmax(llm, llm.ctx, -1)]
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(_argmax(llm, llm.ctx, -1))
    return out, prefill_s, time.perf_counter() - started


def llamacpp_context(llm, n_seq: int, threads: int):
    """A second llama.cpp context on the same weights holding n_seq sequences (the Llama object holds one)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 2048, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, threads, threads
    return llama_cpp.llama_init_from_model(llm.model, params)


def llamacpp_batched(llm, ctx, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy-decode prompts together through llama.cpp's C API: one llama_batch per step, one seq_id each."""
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    batch = llama_cpp.llama_batch_init(max(512, sum(map(len, prompts))), 0, 1)
    try:
        def submit(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, seq_id, wants logits)
            batch.n_tokens = len(entries)
            for j, (token, pos, seq, wants) in enumerate(entries):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, pos, 1, wants
                batch.seq_id[j][0] = seq
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        entries = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        submit(entries)
        last = [j for j, e in enumerate(entries) if e[3]]  # batch rows holding each prompt's last position
        outs = [[_argmax(llm, ctx, j)] for j in last]
        for step in range(n - 1):
            submit([(out[-1], len(p) + step, s, True) for s, (p, out) in enumerate(zip(prompts, outs))])
            for s, out in enumerate(outs):
                out.append(_argmax(llm, ctx, s))
        return outs
    finally:
        llama_cpp.llama_batch_free(batch)


def run_transformers(spec: BenchSpec, result: ChildResult) -> None:
    torch = _import_torch(spec, result)
    started = time.perf_counter()
    import transformers
    from transformers import LlamaForCausalLM

    result.import_s += time.perf_counter() - started
    result.versions["transformers"] = transformers.__version__
    model, result.load_s = timed(LlamaForCausalLM.from_pretrained, spec.hf_dir, dtype=torch.float32)
    model.eval()
    result.notes.append("fp32 weights dequantized by corral (gguf_file= needs accelerate); batch left-padded")

    @torch.inference_mode()
    def step(prompts: list[list[int]], n: int) -> tuple[float, float, int]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        prefill_s = 0.0
        if len(prompts) == 1:  # the batched figure is the generate call's wall time alone
            _, prefill_s = timed(model, input_ids=ids, attention_mask=mask, logits_to_keep=1)
        out, generate_s = timed(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        # generate repeats the prefill; its decode time is the rest.
        return prefill_s, max(generate_s - prefill_s, 1e-9), (out.shape[1] - width) * len(prompts)

    _measure(spec, result, step)


def child_main() -> int:
    spec = BenchSpec(**json.loads(sys.stdin.read()))
    result = run_child(spec)
    print(RESULT_TAG + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
