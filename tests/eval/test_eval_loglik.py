"""The log-likelihood core against the plain path: one full forward of context + continuation."""

import warnings

import pytest
import torch

from corral.eval import tasks
from corral.eval.loglik import ContextTruncated, LocalModel, rolling_windows


def reference(llm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log p(cont | ctx) and all-argmax, from the model's own forward over the whole sequence."""
    with torch.no_grad():
        logp = llm.model(torch.tensor([ctx + cont]))[0].log_softmax(-1)[len(ctx) - 1:-1]  # (len(cont), vocab)
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_scores_match_a_full_forward_for_shared_and_separate_contexts(smollm2_fp32, fp32_scorer):
    task = tasks.TASKS["hellaswag"]
    pairs = tasks.requests(task, tasks.load_docs(task)[0]) + [("The capital of France is", " Paris"),
                                                               ("1, 2, 3,", " 4, 5, 6")]
    got = fp32_scorer.loglikelihood(pairs)
    for pair, (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = reference(smollm2_fp32, *fp32_scorer.encode_pair(*pair))
        assert lp == pytest.approx(want_lp, abs=1e-3) and greedy == want_greedy
    assert got[-1][1] is True  # " 4, 5, 6" is what the model would write


def test_trailing_space_of_context_moves_to_the_continuation(fp32_scorer):
    assert fp32_scorer.encode_pair("Answer: ", "B") == fp32_scorer.encode_pair("Answer:", " B")
    ctx, cont = fp32_scorer.encode_pair("Hello", " world")
    assert ctx + cont == fp32_scorer.encode("Hello world")


def test_empty_context_conditions_on_the_prefix_token(smollm2_fp32, fp32_scorer):
    ctx, cont = fp32_scorer.encode_pair("", "Hello world")
    assert ctx == [smollm2_fp32.tokenizer.bos_id]
    (lp, _), = fp32_scorer.loglikelihood([("", "Hello world")])
    assert lp == pytest.approx(reference(smollm2_fp32, ctx, cont)[0], abs=1e-3)


def test_reused_few_shot_prefix_gives_the_scores_of_fresh_runs(smollm2_fp32):
    task = tasks.TASKS["mmlu"]
    docs = tasks.load_docs(task)[:3]
    pool = tasks.load_docs(task, source=task.fewshot)
    prefixes = [tasks.fewshot_prefix(d, tasks.fewshot_examples(task, docs, pool, i, 2, 0)) for i, d in enumerate(docs)]
    pairs = [p for d, prefix in zip(docs, prefixes) for p in tasks.requests(task, d, prefix)]
    batched = LocalModel.from_llm(smollm2_fp32).loglikelihood(pairs)
    fresh = [LocalModel.from_llm(smollm2_fp32, batch_size=1).loglikelihood([p])[0] for p in pairs]
    assert [g for _, g in batched] == [g for _, g in fresh]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in fresh], abs=1e-4)


def test_request_longer_than_context_is_truncated_left_with_a_warning(smollm2_fp32):
    scorer = LocalModel.from_llm(smollm2_fp32, max_length=12)
    context = "one two three four five six seven eight nine ten eleven twelve thirteen"
    ctx, cont = scorer.encode_pair(context, " fourteen fifteen")
    with pytest.warns(ContextTruncated, match="dropped"):
        (lp, _), = scorer.loglikelihood([(context, " fourteen fifteen")])
    kept = (ctx + cont)[-13:]  # lm-eval keeps the last max_length + 1 tokens
    assert lp == pytest.approx(reference(smollm2_fp32, kept[: -len(cont)], cont)[0], abs=1e-3)


def test_rolling_windows_are_lm_evals_disjoint_windows():
    utils = pytest.importorskip("lm_eval.utils")
    for n, size in [(1, 4), (4, 4), (10, 4), (23, 7), (8, 8), (9, 8)]:
        ids = list(range(100, 100 + n))
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(ids, 1, size, 1)]
        assert rolling_windows(ids, 1, size) == [tuple(w) for w in want]


def test_rolling_log_likelihood_with_windows_counts_every_token_once(smollm2_fp32):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of folly"
    ids = smollm2_fp32.tokenizer.encode(text)
    whole = LocalModel.from_llm(smollm2_fp32).loglikelihood_rolling([text])[0]
    assert whole == pytest.approx(reference(smollm2_fp32, [smollm2_fp32.tokenizer.bos_id], ids)[0], abs=1e-3)
    small = LocalModel.from_llm(smollm2_fp32, max_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # windows fit by construction: no truncation
        windowed = small.loglikelihood_rolling([text])[0]
    want = sum(reference(smollm2_fp32, c, p)[0] for c, p in rolling_windows(ids, small.prefix_id, 8))
    assert windowed == pytest.approx(want, abs=1e-3) and windowed < whole  # less context: less likely


def test_quantized_default_model_scores_like_its_fp32_widening(one_thread, fp32_scorer):
    import corral

    scorer = LocalModel.from_llm(corral.load())  # the GGUF's own Q4/Q8 blocks; output projection widened once
    task = tasks.TASKS["arc_easy"]
    pairs = [p for d in tasks.load_docs(task)[:5] for p in tasks.requests(task, d)]
    quant = [lp for lp, _ in scorer.loglikelihood(pairs)]
    full = [lp for lp, _ in fp32_scorer.loglikelihood(pairs)]
    # Q8 activations and float16 keys: a few hundredths of a nat per token, never a different scale
    assert all(abs(q - f) < 0.05 * abs(f) + 0.5 for q, f in zip(quant, full))
