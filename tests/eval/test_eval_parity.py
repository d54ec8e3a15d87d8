"""Parity with lm-evaluation-harness's `hf` backend (transformers, fp32) on SmolLM2-135M-Instruct.

The golden files are lm-eval's per-example log-likelihoods on the same rows and prompts, recorded once by
scripts/lmeval_golden.py (lm-eval is slow on a shared 2-core machine). Here Corral scores the first ROWS
rows of each; scripts/eval_parity.py compares every recorded row. The live test runs lm-eval itself on a
few rows, so a change on either side shows up even without regenerating the files.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from corral.eval import metrics, tasks

GOLDEN = Path(__file__).parents[1] / "golden"
ROWS = 40
PARITY_TASKS = ["hellaswag", "arc_easy", "piqa"]


def golden(task: str) -> dict:
    path = GOLDEN / f"lmeval_hf_smollm2_{task}.json"
    if not path.is_file():
        pytest.fail(f"missing golden file {path.name}: run scripts/lmeval_golden.py")
    return json.loads(path.read_text())


def corral_scores(scorer, task_name: str, doc_ids: list[int]) -> list[list[float]]:
    task = tasks.TASKS[task_name]
    docs = tasks.load_docs(task)
    pairs = [tasks.requests(task, docs[i]) for i in doc_ids]
    flat = scorer.loglikelihood([p for ps in pairs for p in ps])
    out, at = [], 0
    for ps in pairs:
        out.append([lp for lp, _ in flat[at:at + len(ps)]])
        at += len(ps)
    return out


@pytest.mark.parametrize("task_name", PARITY_TASKS)
def test_loglikelihoods_and_accuracy_match_lm_eval_hf(fp32_scorer, task_name):
    gold = golden(task_name)
    rows = gold["rows"][:ROWS]
    ours = corral_scores(fp32_scorer, task_name, [r["doc_id"] for r in rows])
    worst = max(abs(a - b) for r, lls in zip(rows, ours) for a, b in zip(r["loglikelihoods"], lls))
    assert worst < 1e-3, f"largest per-example log-likelihood difference {worst:.2e}"
    docs = tasks.load_docs(tasks.TASKS[task_name])
    scores = [metrics.choice_scores(lls, docs[r["doc_id"]].choices, docs[r["doc_id"]].gold)
              for r, lls in zip(rows, ours)]
    for metric in ("acc", "acc_norm"):
        theirs = sum(r[metric] for r in rows) / len(rows)
        mine = sum(s[metric] for s in scores) / len(rows)
        assert abs(mine - theirs) * 100 <= 0.5, f"{metric}: corral {mine:.4f}, lm-eval {theirs:.4f}"


@pytest.mark.slow
def test_live_lm_eval_hf_on_five_rows_matches_corral(fp32_scorer, tmp_path, monkeypatch):
    """lm-eval + transformers run here, offline, on the repository's YAML task and data."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    script = Path(__file__).parents[2] / "scripts" / "lmeval_golden.py"
    spec = importlib.util.spec_from_file_location("lmeval_golden", script)
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).parents[2])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recorder.export_smollm2(tmp_path / "hf")
    live = recorder.run("arc_easy", tmp_path / "hf", limit=5, batch_size=4)
    ours = corral_scores(fp32_scorer, "arc_easy", [r["doc_id"] for r in live["rows"]])
    for row, lls in zip(live["rows"], ours):
        assert row["loglikelihoods"] == pytest.approx(lls, abs=1e-3)
