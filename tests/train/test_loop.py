"""The shared training loop with an objective it has never seen: a toy defined here, nothing in train/ for it.

The toy is a next-token loss on reversed sequences (runs that count up, read backwards), computed through
``sequence_logprobs``. The loop supplies the rest:
checkpoints, resume after a crash (RELIABILITY.md 29-30), metrics.
"""

from __future__ import annotations

import pytest
import torch

from corral.checkpoint.base import weight_shapes
from corral.train.config import load_config
from corral.train.failure import InjectedCrash
from corral.train.loop import IterableSource, read_metrics, train_loop
from corral.train.loss import sequence_logprobs
from corral.train.run import Run
from corral.train.setup import build_optim, fresh_model, parallelize_model, start_processes
from corral.train.state import latest_checkpoint, load_model_weights

# --- the toy objective: next-token loss on reversed sequences ---------------------------------
VOCAB, SEQ, BATCH = 32, 16, 8


def counting_batches(seed: int = 0):
    """An endless, deterministic stream of (BATCH, SEQ) runs counting up from random starts (mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ)) % VOCAB


def reversed_loss(model, seqs: torch.Tensor):
    """Mean next-token -log p over each sequence read backwards (so the model must learn to count down)."""
    tokens = seqs.flip(1)  # (B, SEQ)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, SEQ - 1) each
    logp = sequence_logprobs(model, inputs, targets)  # (B, SEQ - 1)
    p_target = logp.detach().exp().mean().item()  # the objective's own metric, logged by the loop
    return -logp.mean(), {"tokens": inputs.numel(), "p_target": p_target}


def toy_run(out_dir, steps: int, **overrides) -> Run:
    """The loop's settings come from the usual sections; the model, transforms and optimizer from the setup phases."""
    values = {"out_dir": f'"{out_dir}"', "model.preset": '"debug"', "model.dim": 32, "model.n_layers": 2,
              "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": VOCAB, "model.multiple_of": 16,
              "train.steps": steps, "train.threads": 1, "train.progress": "false",
              "train.tensorboard": "false", "optim.warmup_steps": 2, "optim.lr": 1e-2, **overrides}
    config = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    procs = start_processes(config)
    model = fresh_model(config.model, procs.device, config.train.seed)
    module, _, _ = parallelize_model(model, config, procs.mesh)
    optimizer, scheduler = build_optim(module, config, procs.mesh)
    return Run(config=config, model=module, optimizer=optimizer, scheduler=scheduler, device=procs.device)


def train_toy(run: Run):
    return train_loop(run, IterableSource(counting_batches), reversed_loss, name="reversed")


# --- tests ----------------------------------------------------------------------------------


def test_toy_objective_trains_and_checkpoints_through_the_shared_loop(tmp_path):
    result = train_toy(toy_run(tmp_path / "run", steps=30, **{"checkpoint.every": 10}))
    records = read_metrics(result.metrics_path)
    assert sorted(records) == list(range(1, 31))
    first, last = records[1]["loss"], sum(records[s]["loss"] for s in range(26, 31)) / 5
    assert first > 3.0 and last < first - 1.0, (first, last)  # about ln(32) at the start; it learned
    assert records[30]["p_target"] > 2 * records[1]["p_target"]
    assert records[30]["tokens_per_s"] > 0 and records[30]["tokens_seen"] == 30 * BATCH * (SEQ - 1)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == result.checkpoint
    config, weights = load_model_weights(result.checkpoint)
    assert {k: tuple(w.shape) for k, w in weights.items()} == weight_shapes(config) and config.vocab_size == VOCAB


def test_toy_objective_crash_then_resume_equals_straight_run(tmp_path):
    straight = train_toy(toy_run(tmp_path / "a", steps=8, **{"checkpoint.every": 4}))
    crashed = toy_run(tmp_path / "b", steps=8, **{"checkpoint.every": 4, "fault.crash_at_step": 6})
    with pytest.raises(InjectedCrash, match="step 6"):
        train_toy(crashed)
    # A new process would start from nothing: new model, optimizer and source; only the disk carries over.
    resumed = train_toy(toy_run(tmp_path / "b", steps=8, **{"checkpoint.every": 4, "checkpoint.resume": '"auto"'}))
    a, b = read_metrics(straight.metrics_path), read_metrics(resumed.metrics_path)
    assert list(a) == list(range(1, 9)) and list(b) == list(range(1, 9))  # step 5 was written twice, kept once
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]  # exact: fp32, one thread
    _, wa = load_model_weights(straight.checkpoint)
    _, wb = load_model_weights(resumed.checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
