"""Record lm-evaluation-harness's `hf` backend (transformers, fp32) on SmolLM2-135M-Instruct as golden files.

    python scripts/lmeval_golden.py --tasks hellaswag,arc_easy,piqa

The embedded GGUF is dequantized by Corral and written as an HF directory (safetensors fp32 + the GGUF's own
tokenizer via transformers' GGUF tokenizer reader), so lm-eval and `corral eval --quant none` score identical
weights and token ids. Tasks are the YAMLs of corral/eval/lmeval_tasks (local JSONL, nothing downloaded).
Writes tests/golden/lmeval_hf_smollm2_<task>.json: per example the log-likelihood and greedy flag of each
choice, plus lm-eval's acc / acc_norm over the rows. tests/eval/test_eval_parity.py compares Corral with it.
Slow on a loaded 2-core machine (an hour or more for 600 rows); run it once, nice'd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "corral" / "eval" / "lmeval_tasks"


def export_smollm2(directory: Path) -> None:
    """fp32 safetensors + tokenizer files of the embedded SmolLM2 GGUF (what LlamaForCausalLM and lm-eval load)."""
    from transformers import AutoTokenizer

    from corral.checkpoint.hf import export_hf
    from corral.checkpoint.load import load_checkpoint
    from corral.llm import default_model_path

    gguf = default_model_path()
    ckpt = load_checkpoint(gguf)
    export_hf(ckpt.config, ckpt.state_dict, directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)


def run(task: str, model_dir: Path, limit: int | None, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32,add_bos_token=False",
        tasks=[f"corral_{task}"], task_manager=TaskManager(include_path=str(TASKS_DIR)), limit=limit,
        log_samples=True, batch_size=batch_size, device="cpu", random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)
    name = f"corral_{task}"
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    rows = [{"doc_id": s["doc_id"], "loglikelihoods": [r[0][0] for r in s["resps"]],
             "greedy": [bool(r[0][1]) for r in s["resps"]], "acc": s.get("acc"), "acc_norm": s.get("acc_norm")}
            for s in samples]
    metrics = out["results"][name]
    return {"task": task, "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)",
            "peer": f"lm-eval {lm_eval.__version__} hf backend", "limit": limit,
            "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"), "rows": rows,
            "made_by": "python scripts/lmeval_golden.py --tasks " + task + (f" --limit {limit}" if limit else "")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=0, help="rows per task (default 0: all dev rows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    with tempfile.TemporaryDirectory(prefix="corral-lmeval-") as tmp:
        export_smollm2(Path(tmp))
        for task in args.tasks.split(","):
            started = time.time()
            golden = run(task, Path(tmp), args.limit or None, args.batch_size)
            golden["seconds"] = round(time.time() - started, 1)
            path = args.out / f"lmeval_hf_smollm2_{task}.json"
            path.write_text(json.dumps(golden, indent=1) + "\n")
            print(f"{task}: acc {golden['acc']} acc_norm {golden['acc_norm']} in {golden['seconds']} s -> {path}",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
