"""The engine's fast paths against the reference path (corral.engine.generate), on a small random model."""

from __future__ import annotations

import pytest
import torch

from corral.engine.engine import ContextLengthError, Engine, RequestError
from corral.engine.generate import generate_tokens
from corral.engine.sampling import SamplingError, SamplingParams
from corral.engine.speculative import DraftModel, PromptLookup, accept_greedy
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256)
GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def make_model(seed: int, config: ModelConfig = CONFIG) -> Transformer:
    torch.manual_seed(seed)
    # std 0.2 makes the random model's next-token choices sharp, so greedy ties never blur a comparison
    return init_weights_(Transformer(config), std=0.2).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(0)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 12, [3, 1], list(range(40, 70)), [100, 101, 102, 100, 101]]


def reference(model, prompt, params=GREEDY) -> list[int]:
    return list(generate_tokens(model, prompt, params))


def test_batched_greedy_matches_reference_with_more_prompts_than_slots(model):
    engine = Engine(model, max_batch_size=3)
    out = engine.generate(PROMPTS, GREEDY)
    for prompt, done in zip(PROMPTS, out):
        assert done.token_ids == reference(model, prompt)
        assert done.finish_reason == "length"
    assert not engine.has_work()


def test_requests_join_a_running_batch_and_still_match_reference(model):
    engine = Engine(model, max_batch_size=4)
    first = engine.submit(PROMPTS[0], GREEDY)[0]
    for _ in range(5):
        engine.step()
    late = engine.submit(PROMPTS[4], GREEDY)[0]  # joins while the first is mid-decode
    while engine.has_work():
        engine.step()
    assert first.output == reference(model, PROMPTS[0])
    assert late.output == reference(model, PROMPTS[4])


def test_prefix_cache_reuses_the_previous_turn(model):
    engine = Engine(model, max_batch_size=2)
    turn1 = PROMPTS[4]
    first = engine.generate([turn1], GREEDY)[0]
    turn2 = turn1 + first.token_ids + [5, 6, 7]
    second = engine.generate([turn2], GREEDY)[0]
    assert second.timings["reused_prefix"] == len(turn1) + len(first.token_ids) - 1
    assert second.token_ids == reference(model, turn2)


def test_prefix_cache_is_not_reused_for_a_different_prompt(model):
    engine = Engine(model, max_batch_size=1)
    engine.generate([PROMPTS[4]], GREEDY)
    other = [9] + PROMPTS[4][1:]
    done = engine.generate([other], GREEDY)[0]
    assert done.timings["reused_prefix"] == 0
    assert done.token_ids == reference(model, other)


def test_prompt_lookup_speculation_is_greedy_identical_and_accepts_some(model):
    lookup = PromptLookup()
    engine = Engine(model, max_batch_size=1, drafter=lookup)
    repetitive = [5, 6, 7, 8] * 6
    for prompt in (repetitive, *PROMPTS[:3]):
        assert engine.generate([prompt], GREEDY)[0].token_ids == reference(model, prompt)
    assert lookup.proposed > 0 and lookup.accepted > 0


def test_draft_model_speculation_is_greedy_identical(model):
    drafter = DraftModel(make_model(1))  # a different model: many drafts get rejected, output must not change
    engine = Engine(model, max_batch_size=1, drafter=drafter, speculate_k=3)
    for prompt in PROMPTS[:4]:
        assert engine.generate([prompt], GREEDY)[0].token_ids == reference(model, prompt)
    self_draft = DraftModel(model)  # the model drafting for itself: every draft is right
    engine = Engine(model, max_batch_size=1, drafter=self_draft, speculate_k=3)
    assert engine.generate([PROMPTS[0]], GREEDY)[0].token_ids == reference(model, PROMPTS[0])
    assert self_draft.accepted == self_draft.proposed > 0


def test_accept_greedy_keeps_agreeing_prefix_then_the_target_token():
    assert accept_greedy([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert accept_greedy([1, 9, 3], [1, 2, 3, 4]) == [1, 2]
    assert accept_greedy([9], [1, 2]) == [1]


def test_seeded_sampling_reproduces_and_n_gives_distinct_samples(model):
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=42, n=4, max_new_tokens=16, ignore_eos=True)
    a = Engine(model).generate([PROMPTS[0]], params)
    b = Engine(model).generate([PROMPTS[0]], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len(a) == 4 and len({tuple(c.token_ids) for c in a}) == 4


def test_top_k_one_equals_greedy(model):
    params = SamplingParams(temperature=1.5, top_k=1, seed=3, max_new_tokens=24, ignore_eos=True)
    assert Engine(model).generate([PROMPTS[1]], params)[0].token_ids == reference(model, PROMPTS[1])


def test_logit_bias_forces_and_bans(model):
    forced = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, logit_bias={17: 100.0})
    assert Engine(model).generate([PROMPTS[0]], forced)[0].token_ids == [17] * 5
    greedy_first = reference(model, PROMPTS[0])[0]
    banned = SamplingParams(temperature=0, max_new_tokens=1, logit_bias={greedy_first: -100.0})
    assert Engine(model).generate([PROMPTS[0]], banned)[0].token_ids[0] != greedy_first


def test_repetition_penalty_stops_repeats_that_greedy_makes(model):
    plain = reference(model, PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True))
    assert len(set(plain)) < len(plain), "the random model repeats itself under greedy"
    params = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True, repetition_penalty=1e6)
    out = Engine(model).generate([PROMPTS[2]], params)[0].token_ids
    assert len(set(out)) == len(out)  # every seen token is pushed below every unseen one
    assert not set(out) & set(PROMPTS[2])


def test_presence_and_frequency_penalties_lower_repeated_tokens(model):
    params = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True, presence_penalty=2.0,
                            frequency_penalty=2.0)
    out = Engine(model).generate([PROMPTS[2]], params)[0].token_ids
    plain = reference(model, PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True))
    assert out != plain
    assert max(out.count(t) for t in set(out)) < max(plain.count(t) for t in set(plain))


def test_logprobs_of_chosen_and_top_tokens_match_the_model(model):
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=3)
    done = Engine(model).generate([PROMPTS[0]], params)[0]
    ids = PROMPTS[0] + done.token_ids
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, vocab)
    for i, choice in enumerate(done.logprobs):
        row = full[len(PROMPTS[0]) - 1 + i]
        assert choice.token == done.token_ids[i]
        assert choice.logprob == pytest.approx(float(row[choice.token]), abs=1e-4)
        assert [t for t, _ in choice.top] == row.topk(3).indices.tolist()
        assert choice.top[0][0] == choice.token  # greedy picks the best


def test_stop_ids_end_a_request_unless_ignore_eos(model):
    tokens = reference(model, PROMPTS[0])
    stop_at = tokens[3]
    engine = Engine(model, stop_ids=[stop_at])
    done = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=24))[0]
    assert done.finish_reason == "stop" and done.token_ids == tokens[: tokens.index(stop_at)]
    assert engine.generate([PROMPTS[0]], GREEDY)[0].token_ids == tokens


def test_cancel_frees_the_slot_for_the_next_request(model):
    engine = Engine(model, max_batch_size=1)
    (req,) = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()
    engine.cancel(req)
    assert req.finish_reason == "cancelled" and engine.running == []
    assert engine.generate([PROMPTS[1]], GREEDY)[0].token_ids == reference(model, PROMPTS[1])


def test_stream_closed_early_cancels_its_request(model):
    engine = Engine(model, max_batch_size=1)
    events = engine.stream(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    next(events)
    next(events)
    events.close()
    assert engine.running == [] and not engine.has_work()


def test_bad_requests_get_typed_errors_naming_the_field(model):
    engine = Engine(model)
    with pytest.raises(ContextLengthError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ContextLengthError, match="context holds 256"):
        engine.submit([1] * 256, GREEDY)
    with pytest.raises(RequestError, match=r"\[0, 512\)"):
        engine.submit([1, 512], GREEDY)
    with pytest.raises(RequestError, match="logit_bias"):
        engine.submit([1], SamplingParams(logit_bias={9999: 1.0}))
    with pytest.raises(SamplingError, match="temperature") as err:
        SamplingParams(temperature=float("nan"), top_p=2)
    assert "top_p" in str(err.value)
    assert not engine.has_work()


def test_context_end_finishes_with_length(model):
    engine = Engine(model, max_seq_len=40)
    done = engine.generate([list(range(30))], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))[0]
    assert done.finish_reason == "length" and len(done.token_ids) == 10


@pytest.mark.slow
def test_compiled_decode_matches_reference(model):
    engine = Engine(model, max_batch_size=2, compile=True)
    out = engine.generate(PROMPTS[:3], GREEDY)
    for prompt, done in zip(PROMPTS[:3], out):
        assert done.token_ids == reference(model, prompt)
