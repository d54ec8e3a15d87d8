"""The `corral` lm-eval model type gives `corral eval`'s numbers (real SmolLM2, lm-eval as the driver)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from corral.eval.generation import generate_local  # noqa: E402
from corral.eval.harness import CorralLM, gen_request, register  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "corral" / "eval" / "lmeval_tasks"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return CorralLM(pretrained="")


def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_hellaswag_through_lm_eval_equals_corral_scoring(backend, monkeypatch):
    from corral.eval.tasks import get_task, load_docs, requests

    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository
    register()
    out = lm_eval.simple_evaluate(model=backend, tasks=["corral_hellaswag"], limit=3, log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)))
    samples = sorted(out["samples"]["corral_hellaswag"], key=lambda s: s["doc_id"])
    task = get_task("hellaswag")
    docs = load_docs(task)[:3]
    for sample, doc in zip(samples, docs):
        pairs = requests(task, doc)
        assert [tuple(a) for a in sample["arguments"]] == pairs  # lm-eval asked for the very same pairs
        ours = backend.scorer.loglikelihood(pairs)
        theirs = [r[0] for r in sample["resps"]]
        assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-6)
    acc = sum(s["acc"] for s in samples) / 3
    assert out["results"]["corral_hellaswag"]["acc,none"] == pytest.approx(acc)


def test_rolling_loglikelihood_is_the_scorers(backend):
    text = "Alice was beginning to get very tired of sitting by her sister on the bank."
    (total,) = backend.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    assert total == pytest.approx(backend.scorer.loglikelihood_rolling([text])[0], abs=1e-6)
    assert total < 0 and math.isfinite(total)


def test_generate_until_is_the_engine_runner_with_lm_evals_stops(backend):
    args = ("Question: What is 2 plus 3?\nAnswer:", {"until": ["\n\n", "Question:"], "max_gen_toks": 20,
                                                     "do_sample": False})
    (text,) = backend.generate_until([_instance("generate_until", args)], disable_tqdm=True)
    ((expected,),) = generate_local(backend.llm, [gen_request(*args)])
    assert text == expected and "Question:" not in text


def test_gen_kwargs_map_to_requests():
    req = gen_request("ctx", {"until": "###", "max_gen_toks": 7})
    assert (req.until, req.max_gen_toks, req.temperature) == (("###",), 7, 0.0)
    assert gen_request("ctx", {"do_sample": True, "temperature": 0.5}).temperature == 0.5
    assert gen_request("ctx", None).until == ()


def test_lm_eval_command_line_runs_the_corral_model(tmp_path):
    cmd = [sys.executable, "-m", "corral.eval.harness", "run", "--model", "corral", "--tasks", "corral_hellaswag",
           "--include_path", str(TASKS_DIR), "--limit", "2", "--output_path", str(tmp_path)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "corral_hellaswag" in proc.stdout and "acc_norm" in proc.stdout
