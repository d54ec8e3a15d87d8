"""Compare Corral with every row of the lm-eval golden files (tests/eval/test_eval_parity.py checks the first 40).

    python scripts/eval_parity.py --tasks hellaswag,arc_easy,piqa [--threads 1]

For each task: rows, the largest per-example log-likelihood difference (with --check-tokens: over the rows
both tokenizers encode alike; the others are listed), acc / acc_norm of both sides, and
Corral's and lm-eval's seconds (lm-eval's from the golden file: another run, maybe another machine load).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compare(task_name: str, scorer, peer_tokens=None) -> dict:
    from corral.eval import metrics, tasks

    gold = json.loads((ROOT / "tests" / "golden" / f"lmeval_hf_smollm2_{task_name}.json").read_text())
    task = tasks.TASKS[task_name]
    docs = tasks.load_docs(task)
    rows = gold["rows"]
    pairs = [tasks.requests(task, docs[r["doc_id"]]) for r in rows]
    started = time.perf_counter()
    flat = scorer.loglikelihood([p for ps in pairs for p in ps])
    seconds = time.perf_counter() - started
    worst, ours, at, differ = 0.0, {"acc": 0.0, "acc_norm": 0.0}, 0, []
    for row, ps in zip(rows, pairs):
        lls = [lp for lp, _ in flat[at:at + len(ps)]]
        at += len(ps)
        if peer_tokens is not None and any(scorer.encode(t) != peer_tokens(t) for c, x in ps for t in (c, c + x)):
            differ.append(row["doc_id"])  # the two sides scored different token ids: not a model difference
        else:
            worst = max(worst, *(abs(a - b) for a, b in zip(lls, row["loglikelihoods"])))
        doc = docs[row["doc_id"]]
        for metric, value in metrics.choice_scores(lls, doc.choices, doc.gold).items():
            ours[metric] += value / len(rows)
    theirs = {m: sum(r[m] for r in rows) / len(rows) for m in ("acc", "acc_norm")}
    return {"task": task_name, "rows": len(rows), "max_abs_loglik_diff": worst, "tokenized_differently": differ,
            "corral": ours, "lm_eval": theirs,
            "corral_s": round(seconds, 1), "lm_eval_s": gold.get("seconds")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--check-tokens", action="store_true",
                        help="leave out of the log-likelihood difference the rows lm-eval's tokenizer (transformers' "
                             "GGUF conversion) encodes differently: it lacks SmolLM2's digit pre-split")
    args = parser.parse_args()
    import torch

    import corral
    from corral.eval.loglik import LocalModel

    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = LocalModel.from_llm(corral.load(quant="none"))
    peer_tokens = None
    if args.check_tokens:
        from transformers import AutoTokenizer

        from corral.llm import default_model_path

        gguf = default_model_path()
        hf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        peer_tokens = lambda text: hf(text, add_special_tokens=False).input_ids  # noqa: E731
    for task in args.tasks.split(","):
        result = compare(task, scorer, peer_tokens)
        print(json.dumps(result), flush=True)
        c, t = result["corral"], result["lm_eval"]
        print(f"{task}: {result['rows']} rows, max |d loglik| {result['max_abs_loglik_diff']:.2e}, acc {c['acc']:.4f} "
              f"vs {t['acc']:.4f}, acc_norm {c['acc_norm']:.4f} vs {t['acc_norm']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
