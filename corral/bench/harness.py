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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from corral.bench.runtimes import RESULT_TAG, BenchSpec, ChildResult, timed

RUNTIMES = ("corral", "llamacpp", "transformers")
QUANTS = ("none", "int8", "int4", "gguf")
BASELINE = "llamacpp"
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
        proc = subprocess.run([sys.executable, "-m", "corral.bench.runtimes"], input=json.dumps(asdict(spec)),
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
            result, seconds = timed(launch_child, spec)
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
    p.add_argument("--corral-quant", type=_choices(QUANTS, "--corral-quant"), default=["gguf"],
                   help="comma list of Corral weight variants: gguf (the file's own blocks, corral.load's default "
                        "for GGUF), none (float32), int8, int4 (default: gguf)")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m corral.bench.harness [args]` or `python bench/engine.py [args]`."""
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
