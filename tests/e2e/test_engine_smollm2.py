"""The engine's fast paths on the real SmolLM2-135M-Instruct, against the reference path (greedy, fp32)."""

from __future__ import annotations

import pytest

import corral
from corral.engine.engine import Engine
from corral.engine.generate import generate_tokens
from corral.engine.sampling import SamplingParams
from corral.engine.speculative import PromptLookup

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
TEXTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Paris is the capital of France. Berlin is the capital of",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def llm():
    return corral.load()


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.tokenizer.encode(t, bos=llm.add_bos) for t in TEXTS]


@pytest.fixture(scope="module")
def references(llm, prompts):
    return [list(generate_tokens(llm.model, p, GREEDY)) for p in prompts]


def test_batched_decode_of_four_prompts_matches_reference(llm, prompts, references):
    out = Engine(llm.model, max_batch_size=4).generate(prompts, GREEDY)
    assert [c.token_ids for c in out] == references


def test_prompt_lookup_speculation_matches_reference(llm, prompts, references):
    lookup = PromptLookup()
    engine = Engine(llm.model, max_batch_size=1, drafter=lookup)
    assert [engine.generate([p], GREEDY)[0].token_ids for p in prompts] == references
    assert lookup.accepted > 0


def test_multi_turn_chat_reuses_the_conversation_prefix(llm):
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = llm.chat(messages, temperature=0, max_new_tokens=24)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    second = llm.chat(messages, temperature=0, max_new_tokens=24)
    ids = llm.chat_format.encode_dialog(messages, add_generation_prompt=True)
    # Everything up to the end of the first answer was already in the cache.
    assert second.timings["reused_prefix"] >= len(ids) - 20
    reference = list(generate_tokens(llm.model, ids, SamplingParams(temperature=0, max_new_tokens=24),
                                     llm.stop_ids))
    assert second.token_ids == [t for t in reference if t not in llm.stop_ids]


def test_stop_string_cuts_streamed_text_exactly(llm):
    full = llm.generate("1, 2, 3, 4, 5,", temperature=0, max_new_tokens=16)
    pieces: list[str] = []
    cut = llm.generate("1, 2, 3, 4, 5,", temperature=0, max_new_tokens=16, stop=[" 8,"], on_text=pieces.append)
    assert cut.text == full.text[: full.text.index(" 8,")]
    assert "".join(pieces) == cut.text and cut.finish_reason == "stop"
