"""Batched generation through the engine equals one-at-a-time greedy generation (real SmolLM2)."""

from __future__ import annotations

import warnings

import pytest

import corral
from corral.eval.generation import GenRequest, PromptTruncated, fit_prompt, generate_local

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
           "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
           "The capital of France is",
           "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def llm():
    return corral.load(max_batch_size=4)


@pytest.mark.slow
def test_batched_greedy_generation_matches_one_by_one(llm):
    requests = [GenRequest(p, until=("\n\n", "Question:"), max_gen_toks=24) for p in PROMPTS]
    seen = []
    batched = generate_local(llm, requests, progress=seen.append)
    assert sum(seen) == len(PROMPTS)
    for req, (text,) in zip(requests, batched):
        alone = llm.generate(req.prompt, temperature=0, max_new_tokens=24, stop=list(req.until))
        assert text == alone.text
        assert "\n\n" not in text and "Question:" not in text


def test_stop_sequence_ends_the_output_before_it(llm):
    ((text,),) = generate_local(llm, [GenRequest("1, 2, 3, 4, 5,", until=(" 8",), max_gen_toks=20)])
    assert text.startswith(" 6, 7,") and not text.endswith(" 8") and " 8" not in text


def test_several_samples_per_prompt_are_seeded_and_distinct(llm):
    req = GenRequest("Once upon a time", max_gen_toks=12, samples=3, temperature=1.0, seed=5)
    first = generate_local(llm, [req])[0]
    again = generate_local(llm, [req])[0]
    assert len(first) == 3 and first == again and len(set(first)) > 1


def test_long_prompt_is_cut_from_the_left_with_a_warning():
    ids = list(range(100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = fit_prompt(ids, context=64, max_gen_toks=16)
    assert kept == ids[-48:] and caught and issubclass(caught[0].category, PromptTruncated)
    assert fit_prompt(ids[:10], context=64, max_gen_toks=16) == ids[:10]


@pytest.mark.slow
def test_generation_tasks_run_end_to_end_through_the_runner(llm):
    from corral.eval.loglik import LocalModel
    from corral.eval.runner import EvalSettings, evaluate
    from corral.eval.tasks import get_task

    seen = []
    report = evaluate(LocalModel.from_llm(llm), [get_task("gsm8k"), get_task("humaneval")], EvalSettings(limit=2),
                      progress_for=lambda task, total: seen.append((task.name, total)) or (lambda k: None))
    values = {(r.task, r.metric): r for r in report.results}
    assert set(values) == {("gsm8k", "exact_match_strict"), ("gsm8k", "exact_match_flexible"),
                           ("humaneval", "pass@1")}
    assert all(0.0 <= r.value <= 1.0 and r.n == 2 for r in report.results)
    assert seen == [("gsm8k", 2), ("humaneval", 2)]


def test_gsm8k_prompt_has_eight_worked_examples_in_lm_evals_shape():
    from corral.eval.runner import EvalSettings, _docs, _prefixes
    from corral.eval.tasks import get_task

    task = get_task("gsm8k")
    docs = _docs(task, EvalSettings(limit=1))
    prompt = _prefixes(task, docs, EvalSettings(limit=1))[0] + docs[0].query
    assert prompt.count("Question: ") == 9 and prompt.count("\n#### ") == 8
    assert "Answer: " in prompt and "Answer:  " not in prompt and prompt.endswith("\nAnswer:")


def test_chat_request_goes_through_the_chat_template(llm):
    from corral.eval.generation import encode_prompt

    req = GenRequest("What is 2 + 2?", max_gen_toks=8, chat=True)
    ids = encode_prompt(llm, req)
    assert ids == llm.chat_format.encode_dialog([{"role": "user", "content": req.prompt}])
    ((text,),) = generate_local(llm, [req])
    assert text == llm.chat([{"role": "user", "content": req.prompt}], temperature=0,
                            max_new_tokens=8).text
