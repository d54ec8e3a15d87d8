"""HellaSwag dev examples/s: `corral eval` against lm-eval's `hf` backend and lm-eval driving llama.cpp's server.

    python bench/eval.py [--limit 100] [--threads 2] [--sides corral,corral_fp32,hf,llamacpp] [--json out.json]

One process, one side after the other, each on the same rows, the same SmolLM2-135M-Instruct weights
and the same number of threads, timed from "model loaded" to "scores out":
- corral: corral eval's own path (the embedded GGUF run by Corral's kernels, as `corral eval` loads it),
  and the same in fp32 (`quant="none"`, the precision of the parity tests);
- hf: lm-eval's `hf` backend (transformers, fp32, batch 8) on an HF copy of the same weights (made once
  under --work: the GGUF widened to fp32 safetensors, the tokenizer converted by transformers);
- llamacpp: lm-eval's `gguf` backend against `python -m llama_cpp.server` (port 0, --logits_all) on the GGUF.
Both lm-eval sides read corral/eval/lmeval_tasks/hellaswag.yaml (the local rows; nothing downloaded).
Prints examples/s per side (wall clock, and per CPU-second of this process plus the server's: on a machine
shared with other jobs the wall clock measures the neighbours too) and corral's ratio to each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS_DIR = ROOT / "corral" / "eval" / "lmeval_tasks"
LMEVAL_TASK = "corral_hellaswag"


def corral_side(limit: int, quant: str | None) -> dict:
    import corral
    from corral.eval.loglik import LocalModel
    from corral.eval.runner import EvalSettings, evaluate
    from corral.eval.tasks import get_task

    backend = LocalModel.from_llm(corral.load(quant=quant))

    def run() -> dict:
        report = evaluate(backend, [get_task("hellaswag")], EvalSettings(limit=limit))
        values = {row.metric: row.value for row in report.results}
        return {"acc": values["acc"], "acc_norm": values["acc_norm"]}

    return timed(run)


def lmeval_side(model, limit: int, server=None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    def run() -> dict:
        tasks = TaskManager(include_path=str(TASKS_DIR))
        out = lm_eval.simple_evaluate(model=model, tasks=[LMEVAL_TASK], task_manager=tasks, limit=limit)
        scores = out["results"][LMEVAL_TASK]
        return {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}

    return timed(run, server)


def cpu_seconds(server=None) -> float:
    """CPU time of this process (all threads) plus a server's: the work done, whatever else loads the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if server is not None:
        import psutil

        times = psutil.Process(server.pid).cpu_times()
        total += times.user + times.system
    return total


def timed(run, server=None) -> dict:
    cpu, wall = cpu_seconds(server), time.perf_counter()
    result = run()
    result.update(seconds=time.perf_counter() - wall, cpu_seconds=cpu_seconds(server) - cpu)
    return result


def hf_copy(work: Path) -> Path:
    """fp32 safetensors of the embedded GGUF plus transformers' conversion of its tokenizer (once)."""
    from corral.bench.harness import export_for_transformers
    from corral.llm import default_model_path

    hf_dir = work / "smollm2-hf"
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    from transformers import AutoTokenizer

    gguf = default_model_path()
    export_for_transformers(gguf, hf_dir)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(hf_dir))
    return hf_dir


def hf_side(limit: int, work: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    return lmeval_side(HFLM(pretrained=str(hf_copy(work)), dtype="float32", batch_size=8, device="cpu"), limit)


def llamacpp_side(limit: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from serve import listening_port

    from corral.llm import default_model_path

    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
           "--port", "0", "--n_threads", str(threads), "--logits_all", "true", "--n_ctx", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = listening_port(proc)
        from lm_eval.models.gguf import GGUFLM

        return lmeval_side(GGUFLM(base_url=f"http://127.0.0.1:{port}"), limit, server=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=100, help="HellaSwag dev rows (default 100)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    p.add_argument("--sides", default="corral,corral_fp32,hf,llamacpp",
                   help="comma list of corral, corral_fp32, hf, llamacpp (default: all)")
    p.add_argument("--work", default=None, help="folder for the HF copy (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="corral-bench-eval-"))
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs = {"corral": lambda: corral_side(args.limit, None), "corral_fp32": lambda: corral_side(args.limit, "none"),
            "hf": lambda: hf_side(args.limit, work), "llamacpp": lambda: llamacpp_side(args.limit, args.threads)}
    names = [n for n in runs if n in sides]
    results = {}
    for name in names:
        r = runs[name]()
        r["examples_per_s"] = args.limit / r["seconds"]
        r["examples_per_cpu_s"] = args.limit / r["cpu_seconds"]
        results[name] = r
        print(f"{name:12s} {r['examples_per_s']:8.3f} ex/s wall  {r['examples_per_cpu_s']:8.3f} ex/CPU-s  "
              f"{r['seconds']:8.1f} s  acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}", flush=True)
    for base in ("hf", "llamacpp"):
        for ours in ("corral", "corral_fp32"):
            if base in results and ours in results:
                wall = results[ours]["examples_per_s"] / results[base]["examples_per_s"]
                cpu = results[ours]["examples_per_cpu_s"] / results[base]["examples_per_cpu_s"]
                print(f"{ours} / {base}: {wall:.2f}x wall, {cpu:.2f}x per CPU-second")
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": args.limit, "threads": args.threads, "results": results},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
