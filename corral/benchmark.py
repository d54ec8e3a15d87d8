"""`corral bench`: Corral, llama.cpp and transformers on the same GGUF file and the same token ids.

The parent tokenizes the prompts once (Corral's tokenizer) and starts one child process per
(runtime, variant), so each child's load time and peak RSS are its own. A child reads a JSON spec
on stdin, does the work and prints one tagged JSON line on stdout. The parent takes medians over
the runs and prints a table with every figure's ratio to llama.cpp.

What is measured, per run (docs in bench/README.md):
  prefill tok/s   prompt_tokens / time to the first new token's logits (512-token prompt)
  decode tok/s    (new_tokens - 1) / time for the remaining steps (batch 1, greedy, EOS ignored)
  batch tok/s     all new tokens of `batch` short prompts / wall time of the whole batched call
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUNTIMES = ("corral", "llamacpp", "transformers")
QUANTS = ("none", "int8", "int4", "gguf")
BASELINE = "llamacpp"
RESULT_TAG = "CORRAL_BENCH_RESULT "
CHILD_TIMEOUT_S = 3600
LABELS = {"corral": "corral", "llamacpp": "llama.cpp", "transformers": "transformers"}

# Written for this benchmark (no third-party text); repeated until the prompt is long enough.
PROMPT_TEXT = (
    "The river town grew up around a ford where cattle crossed in the dry months. Over two centuries the ford "
    "became a wooden bridge, then a stone one, and the market that gathered at its eastern end became the "
    "reason people stayed. Farmers brought grain and wool; boatmen brought salt, timber and news from the "
    "coast. In the spring floods the lower streets filled with brown water, and the older houses still carry "
    "marks on their walls showing how high it rose in each bad year. A railway arrived late, after a long "
    "argument in the council about whether the noise would ruin the Sunday market, and when it finally came "
    "it was the market that changed: buyers from the city could now arrive in the morning and leave by "
    "evening, so prices rose and the smaller stalls gave way to warehouses near the station. The school was "
    "founded by a retired ship's carpenter who taught arithmetic with rope, knots and pulleys, and for many "
    "years the town produced more engineers than lawyers. Today the bridge is closed to cars, the warehouses "
    "hold a library and a bakery, and on summer evenings children fish from the same stones where the cattle "
    "once waited for the water to fall. Visitors ask why the clock on the church tower runs four minutes "
    "slow; the answer, which nobody can prove, is that it was set by the first train and never corrected. "
)


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


# ---- prompts (parent) --------------------------------------------------------------------------


def make_prompts(tokenizer, add_bos: bool, prompt_tokens: int = 512, batch: int = 8,
                 batch_len: int = 32) -> tuple[list[int], list[list[int]]]:
    """One prompt of exactly prompt_tokens ids and `batch` different short prompts of about batch_len ids.

    The short prompts are slices at different offsets with lengths batch_len-3 .. batch_len+4, so a
    batched runtime must handle sequences at different positions.
    """
    from corral.errors import ConfigError

    ids: list[int] = tokenizer.encode(PROMPT_TEXT)
    if not ids:
        raise ConfigError("the benchmark text encodes to no tokens with this tokenizer")
    while len(ids) < prompt_tokens + batch * (batch_len + 8):
        ids = ids + ids
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompt = (bos + ids)[:prompt_tokens]
    lengths = [max(1, batch_len - 3 + i % 8) for i in range(batch)]
    shorts = [bos + ids[i * (batch_len + 8):][:n] for i, n in enumerate(lengths)]
    return prompt, shorts


def load_gguf_tokenizer(path: Path):
    """Corral's tokenizer from the GGUF's metadata alone (no weights read)."""
    from corral.checkpoint.gguf_reader import read_gguf
    from corral.tokenizer import load_bpe_from_gguf_metadata

    with read_gguf(path) as gguf:
        tokenizer = load_bpe_from_gguf_metadata(gguf.metadata)
    return tokenizer, tokenizer.add_bos


def export_for_transformers(model_path: Path, directory: Path) -> None:
    """transformers' own GGUF loader needs `accelerate`; give it the same weights as fp32 safetensors instead."""
    from corral.checkpoint.hf import export_hf
    from corral.checkpoint.load import load_checkpoint

    ckpt = load_checkpoint(model_path)
    export_hf(ckpt.config, ckpt.state_dict, directory)


# ---- the child process ---------------------------------------------------------------------------


def peak_rss_mib() -> float:
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


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
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
    kwargs: dict[str, Any] = {}
    if spec.variant != "none":
        kwargs["quant"] = spec.variant
    if spec.compile:
        kwargs["compile"] = True
    if len(spec.batch_prompts) > 8:  # the engine's default batch size
        kwargs["max_batch_size"] = len(spec.batch_prompts)
    llm, result.load_s = _timed(corral.load, spec.model_path, **kwargs)
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
        (_, _, total), wall = _timed(step, spec.batch_prompts, spec.new_tokens)
        result.batch_tok_s.append(total / wall)


def run_llamacpp(spec: BenchSpec, result: ChildResult) -> None:
    started = time.perf_counter()
    import llama_cpp

    result.import_s = time.perf_counter() - started
    result.versions["llama_cpp"] = llama_cpp.__version__
    llm, result.load_s = _timed(llama_cpp.Llama, spec.model_path, n_threads=spec.threads,
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
    _, prefill_s = _timed(llm.eval, prompt)
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
    model, result.load_s = _timed(LlamaForCausalLM.from_pretrained, spec.hf_dir, dtype=torch.float32)
    model.eval()
    result.notes.append("fp32 weights dequantized by corral (gguf_file= needs accelerate); batch left-padded")

    @torch.inference_mode()
    def step(prompts: list[list[int]], n: int) -> tuple[float, float, int]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        prefill_s = 0.0
        if len(prompts) == 1:  # the batched figure is the generate call's wall time alone
            _, prefill_s = _timed(model, input_ids=ids, attention_mask=mask, logits_to_keep=1)
        out, generate_s = _timed(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        # generate repeats the prefill; its decode time is the rest.
        return prefill_s, max(generate_s - prefill_s, 1e-9), (out.shape[1] - width) * len(prompts)

    _measure(spec, result, step)


# The child loads this file by path, not as `corral.benchmark`: importing the corral package imports
# torch, which would inflate llama.cpp's peak RSS and hide Corral's import time.
CHILD_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("corral_bench_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
sys.exit(module.child_main())
"""


def child_main() -> int:
    spec = BenchSpec(**json.loads(sys.stdin.read()))
    result = run_child(spec)
    print(RESULT_TAG + json.dumps(asdict(result)), flush=True)
    return 0


# ---- the parent ----------------------------------------------------------------------------------


def parse_child_output(stdout: str) -> dict | None:
    """The last tagged line of a child's stdout (libraries may print their own lines before it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def launch_child(spec: BenchSpec, timeout: float = CHILD_TIMEOUT_S) -> ChildResult:
    """Run one spec in a fresh interpreter; a crash or a missing result becomes an error row."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD_BOOTSTRAP, __file__], input=json.dumps(asdict(spec)),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ChildResult(runtime=spec.runtime, variant=spec.variant, error=f"timed out after {timeout:.0f} s")
    data = parse_child_output(proc.stdout)
    if data is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return ChildResult(runtime=spec.runtime, variant=spec.variant, error=f"exit {proc.returncode}: {tail}")
    return ChildResult(**data)


def summarize(result: ChildResult) -> dict[str, Any]:
    """One table row: medians of the per-run figures."""
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    label = LABELS[result.runtime] + (f" ({result.variant})" if result.variant else "")
    return {"name": label, "runtime": result.runtime, "variant": result.variant, "import_s": result.import_s,
            "load_s": result.load_s, "peak_rss_mib": result.peak_rss_mib,
            "prefill_tok_s": median(result.prefill_tok_s), "decode_tok_s": median(result.decode_tok_s),
            "batch_tok_s": median(result.batch_tok_s), "runs": len(result.decode_tok_s), "notes": result.notes,
            "versions": result.versions, "error": result.error}


METRICS = ("load_s", "peak_rss_mib", "prefill_tok_s", "decode_tok_s", "batch_tok_s")


def add_ratios(rows: list[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Each row gets `ratio[metric] = value / baseline value` (for load and RSS lower is better)."""
    base = next((r for r in rows if r["runtime"] == baseline and not r["error"]), None)
    for row in rows:
        row["ratio"] = {}
        for metric in METRICS:
            value, ref = row.get(metric), (base or {}).get(metric)
            row["ratio"][metric] = value / ref if value is not None and ref and not row["error"] else None
        decode, batch = row.get("decode_tok_s"), row.get("batch_tok_s")
        row["batch_over_decode"] = batch / decode if decode and batch else None
    return rows


def format_table(rows: list[dict[str, Any]], batch: int = 8) -> str:
    """A plain-text table; each figure with its ratio to llama.cpp in brackets."""
    heads = ["runtime", "import s", "load s", "peak RSS MiB", "prefill tok/s", "decode tok/s",
             f"batch-{batch} tok/s", f"b{batch}/b1"]

    def cell(row: dict, metric: str, fmt: str) -> str:
        value, ratio = row.get(metric), row["ratio"].get(metric)
        if value is None:
            return "-"
        return format(value, fmt) + (f" ({ratio:.2f}x)" if ratio is not None else "")

    lines = []
    for row in rows:
        if row["error"]:
            lines.append([row["name"], "error: " + row["error"]])
            continue
        b_ratio = row["batch_over_decode"]
        lines.append([row["name"], f"{row['import_s']:.2f}", cell(row, "load_s", ".2f"),
                      cell(row, "peak_rss_mib", ".0f"), cell(row, "prefill_tok_s", ".1f"),
                      cell(row, "decode_tok_s", ".1f"), cell(row, "batch_tok_s", ".1f"),
                      f"{b_ratio:.2f}x" if b_ratio else "-"])
    full = [heads] + [r for r in lines if len(r) == len(heads)]  # error rows span the table; they set no width
    widths = [max(len(r[i]) for r in full) for i in range(len(heads))]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) if len(r) > 2 else "  ".join(r) for r in lines]
    notes = [f"  {row['name']}: {'; '.join(row['notes'])}" for row in rows if row["notes"]]
    return "\n".join(out + (["notes:"] + notes if notes else []))


def plan_specs(args: argparse.Namespace, model_path: Path, hf_dir: Path | None) -> list[BenchSpec]:
    """One spec per (runtime, variant): llama.cpp first (the baseline), then Corral's variants, then transformers."""
    tokenizer, add_bos = load_gguf_tokenizer(model_path)
    prompt, shorts = make_prompts(tokenizer, add_bos, args.prompt_tokens, args.batch)
    common = dict(model_path=str(model_path), prompt=prompt, batch_prompts=shorts, new_tokens=args.new_tokens,
                  runs=args.runs, threads=args.threads, compile=args.compile)
    specs = [BenchSpec(runtime="llamacpp", variant="", **common)] if "llamacpp" in args.runtimes else []
    if "corral" in args.runtimes:
        specs += [BenchSpec(runtime="corral", variant=q, **common) for q in args.corral_quant]
    if "transformers" in args.runtimes:
        specs.append(BenchSpec(runtime="transformers", variant="", hf_dir=str(hf_dir), **common))
    return specs


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every planned child and return the report (settings, machine, rows with medians and ratios)."""
    import platform

    from corral.llm import default_model_path

    model_path = Path(args.model) if args.model else default_model_path()
    if not model_path.is_file():
        from corral.errors import ModelNotFoundError

        raise ModelNotFoundError(f"model file not found: {model_path} (the benchmark needs a GGUF file)")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        hf_dir = Path(tmp) / "hf"
        if "transformers" in args.runtimes:
            export_for_transformers(model_path, hf_dir)
        rows = []
        for spec in plan_specs(args, model_path, hf_dir):
            name = spec.runtime + (f"/{spec.variant}" if spec.variant else "")
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            result, seconds = _timed(launch_child, spec)
            rows.append(summarize(result))
            print(f"[bench] {name} done in {seconds:.0f} s: {_brief(rows[-1])}", file=sys.stderr, flush=True)
    settings = {k: getattr(args, k) for k in ("runs", "threads", "prompt_tokens", "new_tokens", "batch", "compile")}
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version()}
    return {"model": str(model_path), "settings": settings, "machine": machine, "rows": add_ratios(rows)}


def _brief(row: dict[str, Any]) -> str:
    if row["error"]:
        return row["error"]
    figures = [f"{m} {row[m]:.4g}" for m in METRICS if row.get(m) is not None]
    return ", ".join(figures)


# ---- command line --------------------------------------------------------------------------------


def _choices(allowed: tuple[str, ...], flag: str):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma list of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--runs", type=_positive, default=3, help="timed runs per runtime; medians are reported (3)")
    p.add_argument("--runtimes", type=_choices(RUNTIMES, "--runtimes"), default=list(RUNTIMES),
                   help="comma list of corral,llamacpp,transformers (default: all)")
    p.add_argument("--corral-quant", type=_choices(QUANTS, "--corral-quant"), default=["none"],
                   help="comma list of Corral weight variants: none,int8,int4,gguf (default: none)")
    p.add_argument("--compile", action="store_true", help="load Corral with compile=True")
    p.add_argument("--threads", type=_positive, default=2, help="threads for every runtime (2)")
    p.add_argument("--prompt-tokens", type=_positive, default=512, help="prefill prompt length (512)")
    p.add_argument("--new-tokens", type=_positive, default=128, help="tokens generated per sequence (128)")
    p.add_argument("--batch", type=_positive, default=8, help="sequences in the batched decode (8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def cmd_bench(args: argparse.Namespace) -> int:
    """Corral vs llama.cpp vs transformers on one GGUF: load, peak RSS, prefill, decode, batched decode."""
    from corral.errors import ConfigError

    if args.new_tokens < 2:
        raise ConfigError("--new-tokens must be at least 2 (decode speed needs steps after the first token)")
    report = run_benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        s = report["settings"]
        print(f"model {Path(report['model']).name}; {s['runs']} run(s), {s['threads']} threads, "
              f"{s['prompt_tokens']}-token prefill, {s['new_tokens']} new tokens, batch {s['batch']}; "
              f"medians, (ratio to llama.cpp)")
        print(format_table(report["rows"], s["batch"]))
    return 0


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Register `bench`; `parents` carries options every subcommand shares (cli.py's --debug)."""
    p = sub.add_parser("bench", help="benchmark Corral against llama.cpp and transformers",
                       description=cmd_bench.__doc__, parents=parents or [])
    add_arguments(p)
    p.set_defaults(handler=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    """`python -m corral.benchmark [args]` or `python bench/engine.py [args]`."""
    argv = sys.argv[1:] if argv is None else argv
    from corral.errors import CorralError

    parser = argparse.ArgumentParser(prog="corral bench", description=cmd_bench.__doc__)
    add_arguments(parser)
    try:
        return cmd_bench(parser.parse_args(argv))
    except CorralError as exc:
        print(f"corral bench: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
