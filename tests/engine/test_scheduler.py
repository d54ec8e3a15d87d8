"""The scheduler (worker thread + asyncio bridge) and the engine's constraint hook, on a small random model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from corral.engine.engine import Engine, RequestError
from corral.engine.generate import generate_tokens
from corral.engine.sampling import SamplingParams
from corral.engine.scheduler import QueueFullError, Scheduler
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256)
GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 12, [3, 1], list(range(40, 70)), [100, 101, 102, 100, 101]]


def make_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return init_weights_(Transformer(CONFIG), std=0.2).eval()


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def reference(model, prompt, params=GREEDY) -> list[int]:
    return list(generate_tokens(model, prompt, params))


@pytest.fixture
def scheduler(model):
    sched = Scheduler(Engine(model, max_batch_size=3), max_queue=4)
    yield sched
    sched.close()


def test_concurrent_tickets_match_single_request_reference(model, scheduler):
    async def run(prompt):
        ticket = scheduler.submit(prompt, GREEDY)
        return [c.token_ids for c in await ticket.completions()][0]

    async def main():
        return await asyncio.gather(*(run(p) for p in PROMPTS[:5]))

    outs = asyncio.run(main())
    for prompt, out in zip(PROMPTS, outs):
        assert out == reference(model, prompt)
    assert scheduler.active == 0 and scheduler.running == 0


def test_events_stream_every_token_in_order_and_end_with_a_reason(model, scheduler):
    async def main():
        ticket = scheduler.submit(PROMPTS[0], GREEDY)
        return [e async for e in ticket.events()], ticket

    events, ticket = asyncio.run(main())
    assert [e.token for e in events] == reference(model, PROMPTS[0])
    assert [e.finish_reason for e in events][-1] == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    assert ticket.first_token_s is not None and ticket.first_token_s > 0


def test_cancel_mid_stream_frees_the_slot_and_others_still_match(model, scheduler):
    long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)

    async def main():
        victim = scheduler.submit(PROMPTS[1], long)
        keeper = scheduler.submit(PROMPTS[2], GREEDY)
        seen = []
        async for e in victim.events():
            seen.append(e)
            if len(seen) == 3:
                victim.cancel()
        return seen, (await keeper.completions())[0]

    seen, kept = asyncio.run(main())
    assert seen[-1].finish_reason == "cancelled"
    assert len(seen) < 50
    assert kept.token_ids == reference(model, PROMPTS[2])
    assert scheduler.active == 0 and scheduler.running == 0


def test_leaving_the_event_loop_early_cancels_the_request(scheduler):
    long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)

    async def main():
        ticket = scheduler.submit(PROMPTS[0], long)
        async for _ in ticket.events():
            break
        for _ in range(200):
            if scheduler.active == 0:
                return ticket
            await asyncio.sleep(0.01)
        return ticket

    ticket = asyncio.run(main())
    assert scheduler.active == 0 and scheduler.running == 0
    assert ticket.requests[0].finish_reason == "cancelled"


def test_past_slots_plus_queue_submit_raises_at_once_and_queued_ones_finish(model, scheduler):
    slow = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)

    async def main():
        tickets = [scheduler.submit(PROMPTS[i % len(PROMPTS)], slow) for i in range(7)]  # 3 slots + 4 queued
        with pytest.raises(QueueFullError, match="3 slots"):
            scheduler.submit(PROMPTS[0], slow)
        return await asyncio.gather(*(t.completions() for t in tickets))

    outs = asyncio.run(main())
    assert [len(o[0].token_ids) for o in outs] == [30] * 7
    assert scheduler.active == 0


def test_bad_input_raises_on_submit_and_counts_nothing(scheduler):
    with pytest.raises(RequestError):
        scheduler.submit([1, 2, 10**6], GREEDY)
    assert scheduler.active == 0


def test_sync_callers_get_events_without_an_event_loop(model, scheduler):
    ticket = scheduler.submit(PROMPTS[3], GREEDY)
    events = list(ticket.iter_events(timeout=60))
    assert [e.token for e in events] == reference(model, PROMPTS[3])


def test_a_failing_step_ends_its_requests_with_an_error_and_the_worker_lives_on(model):
    engine = Engine(model, max_batch_size=2)
    sched = Scheduler(engine)
    real_decode, calls = engine.decode, {"n": 0}

    def flaky(running):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_decode(running)

    engine.decode = flaky
    try:
        events = list(sched.submit(PROMPTS[0], GREEDY).iter_events(timeout=60))
        assert events[-1].finish_reason == "error" and "injected failure" in events[-1].error
        after = list(sched.submit(PROMPTS[0], GREEDY).iter_events(timeout=60))
        assert [e.token for e in after] == reference(model, PROMPTS[0])
        assert sched.active == 0 and sched.running == 0
    finally:
        sched.close()


class _OnlyTokens:
    """A toy constraint: the output must be exactly `wanted`, then it is complete."""

    def __init__(self, wanted: list[int], vocab: int):
        self.wanted, self.vocab, self.out = wanted, vocab, []

    def mask(self):
        allowed = torch.zeros(self.vocab, dtype=torch.bool)
        if len(self.out) < len(self.wanted):  # all False once complete: nothing may follow
            allowed[self.wanted[len(self.out)]] = True
        return allowed

    def advance(self, token: int) -> None:
        self.out.append(token)

    def complete(self) -> bool:
        return self.out == self.wanted


def test_engine_constraint_masks_every_step_and_ends_when_complete(model):
    engine = Engine(model, max_batch_size=2)
    wanted = [5, 9, 300, 7]
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=50, n=2)
    reqs = engine.submit(PROMPTS[0], sampled, constraint_factory=lambda: _OnlyTokens(wanted, 512))
    free = engine.submit(PROMPTS[1], GREEDY)[0]
    while engine.has_work():
        engine.step()
    assert [r.output for r in reqs] == [wanted, wanted]
    assert [r.finish_reason for r in reqs] == ["stop", "stop"]
    assert free.output == reference(model, PROMPTS[1])


class PausedPrefill:
    """Wraps a model: a forward over more than one token signals `started`, then waits for `go` (so a test can
    cancel while a prefill is in flight), then runs the real model."""

    def __init__(self, model):
        import threading

        self.model, self.started, self.go = model, threading.Event(), threading.Event()

    def __call__(self, tokens, *args, **kwargs):
        if tokens.shape[1] > 1:
            self.started.set()
            assert self.go.wait(30)
        return self.model(tokens, *args, **kwargs)


def test_cancel_reaches_a_prefill_in_flight(model):
    """RELIABILITY 42: a client that leaves during prefill stops it at the next layer, not after the forward."""
    engine = Engine(model, max_batch_size=2)
    engine.model = PausedPrefill(model)
    sched = Scheduler(engine, max_queue=4)
    try:
        ticket = sched.submit(list(range(1, 200)), SamplingParams(temperature=0, max_new_tokens=8, n=2))
        assert engine.model.started.wait(30)
        ticket.cancel()
        engine.model.go.set()
        events = list(ticket.iter_events(timeout=30))
        assert [e.finish_reason for e in events] == ["cancelled", "cancelled"]
        assert all("prefill_s" not in r.timings and not r.output for r in ticket.requests)
        assert engine.kept == [[], []] and sched.active == 0 and sched.running == 0
        engine.model = model  # the next request runs normally on the freed slot
        out = sched.submit([5, 6, 7], GREEDY).iter_events(timeout=30)
        assert [e.token for e in out if e.token >= 0] == reference(model, [5, 6, 7])
    finally:
        sched.close()
