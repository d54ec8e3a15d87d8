"""The pretraining loop: metrics, NaN/spike handling, kill -9 + resume == straight run (RELIABILITY.md 29-34)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from train_fixtures import REPO, pretrain_command, run_pretrain_process, tiny_config, tiny_overrides, write_tiny_data

from corral.train.config import FailureConfig
from corral.train.failure import LossGuard
from corral.train.loop import read_metrics
from corral.train.pretrain import run_pretrain


def _events(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "event" in r]


def test_run_writes_metrics_tensorboard_validation_and_checkpoint(tmp_path):
    write_tiny_data(tmp_path)
    config = tiny_config(tmp_path / "run", tmp_path, steps=6, **{"train.tensorboard": True, "train.val_every": 3})
    result = run_pretrain(config)
    assert result.steps == 6 and result.tokens_seen == 6 * 4 * 16
    assert result.n_params == config.model.num_params()
    records = read_metrics(result.metrics_path)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for record in records.values():
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"} <= set(record)
    assert records[6]["loss"] < records[1]["loss"]
    assert [e["step"] for e in _events(result.metrics_path) if e["event"] == "val"] == [3, 6]
    assert result.final_val_loss is not None and result.final_val_loss < records[1]["loss"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint.name == "step_00000006" and (result.checkpoint / "COMMIT").exists()


def test_nan_loss_at_step_k_is_skipped_and_recorded(tmp_path):
    write_tiny_data(tmp_path)
    result = run_pretrain(tiny_config(tmp_path / "run", tmp_path, steps=5, **{"fault.nan_at_step": 3}))
    events = _events(result.metrics_path)
    assert [(e["step"], e["event"]) for e in events if "nan" in e["event"]] == [(3, "nan_skip")]
    records = read_metrics(result.metrics_path)
    assert records[3]["applied"] is False and records[4]["applied"] is True
    assert all(torch.isfinite(torch.tensor(r["loss"])) for s, r in records.items() if s != 3)
    assert result.steps == 5


def test_nan_loss_with_rollback_policy_restores_last_checkpoint(tmp_path):
    write_tiny_data(tmp_path)
    config = tiny_config(tmp_path / "run", tmp_path, steps=7, **{"fault.nan_at_step": 5, "checkpoint.every": 2,
                                                                  "failure.nan_policy": "rollback"})
    result = run_pretrain(config)
    rollback = [e for e in _events(result.metrics_path) if e["event"] == "nan_rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 5 and rollback[0]["rolled_back_to"] == 4
    assert result.steps == 7
    assert json.loads((result.checkpoint / "meta.json").read_text())["extra"]["rollbacks"] == 1


def test_loss_guard_flags_spike_over_running_mean():
    guard = LossGuard(FailureConfig(spike_factor=2.0, spike_window=3))
    for loss in (4.0, 4.2, 3.8):
        assert guard.verdict(loss) is None
        guard.accept(loss)
    assert guard.verdict(7.9) is None
    assert guard.verdict(8.1) == "spike"
    assert guard.verdict(float("inf")) == "nan"


def _final_state(step_dir, tmp_path, name):
    flat = tmp_path / f"{name}.pt"
    dcp_to_torch_save(step_dir, flat)
    state = torch.load(flat, weights_only=False)
    per_rank = torch.load(step_dir / "rank0.pt", weights_only=True)
    meta = json.loads((step_dir / "meta.json").read_text())
    return state, per_rank, meta


def _assert_nested_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


@pytest.mark.slow
def test_kill9_then_resume_equals_straight_run(tmp_path):
    """N steps + SIGKILL + N resumed steps == 2N straight steps: losses, weights, optimizer, RNG, data position."""
    n = 4
    write_tiny_data(tmp_path)
    straight = run_pretrain_process(tiny_overrides(tmp_path / "a", tmp_path, steps=2 * n, **{"checkpoint.every": n}))
    assert straight.returncode == 0, straight.stderr
    # The victim hangs inside step n + 1 (after committing step n) until the test SIGKILLs it from outside.
    victim_args = tiny_overrides(tmp_path / "b", tmp_path, steps=2 * n, **{"checkpoint.every": n,
                                                                         "fault.hang_at_step": n + 1})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(pretrain_command(victim_args), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "b" / f"fault_hang_{n + 1}.rank0.fired", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    resumed = run_pretrain_process(victim_args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    losses_a = {s: r["loss"] for s, r in read_metrics(tmp_path / "a" / "metrics.jsonl").items()}
    losses_b = {s: r["loss"] for s, r in read_metrics(tmp_path / "b" / "metrics.jsonl").items()}
    assert list(losses_a) == list(range(1, 2 * n + 1))
    assert losses_a == losses_b  # exact: fp32 on CPU with one thread is deterministic
    final = f"step_{2 * n:08d}"
    state_a, rank_a, meta_a = _final_state(tmp_path / "a" / "checkpoints" / final, tmp_path, "a")
    state_b, rank_b, meta_b = _final_state(tmp_path / "b" / "checkpoints" / final, tmp_path, "b")
    _assert_nested_equal(state_a["model"], state_b["model"], "model")
    _assert_nested_equal(state_a["optim"], state_b["optim"], "optim")
    _assert_nested_equal(rank_a, rank_b, "rng+scheduler")
    assert meta_a["loader"] == meta_b["loader"] and meta_a["extra"]["tokens_seen"] == meta_b["extra"]["tokens_seen"]


@pytest.mark.slow
def test_kill9_during_save_leaves_uncommitted_checkpoint_that_resume_ignores(tmp_path):
    write_tiny_data(tmp_path)
    args = tiny_overrides(tmp_path / "run", tmp_path, steps=6, **{"checkpoint.every": 2,
                                                                   "fault.kill_in_save_at_step": 4})
    killed = run_pretrain_process(args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_00000004" / "meta.json").exists()  # written, never committed
    assert not (ckpts / "step_00000004" / "COMMIT").exists()
    resumed = run_pretrain_process(args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    events = _events(tmp_path / "run" / "metrics.jsonl")
    assert [e["checkpoint"].rsplit("/", 1)[-1] for e in events if e["event"] == "resumed"] == ["step_00000002"]
    assert (ckpts / "step_00000006" / "COMMIT").exists() and (ckpts / "step_00000004" / "COMMIT").exists()


def test_grad_accumulation_matches_one_larger_batch(tmp_path):
    write_tiny_data(tmp_path)
    big = run_pretrain(tiny_config(tmp_path / "big", tmp_path, steps=3))
    accum = run_pretrain(tiny_config(tmp_path / "acc", tmp_path, steps=3, **{"data.batch_size": 2,
                                                                            "optim.grad_accum": 2}))
    a, b = read_metrics(big.metrics_path), read_metrics(accum.metrics_path)
    assert big.tokens_seen == accum.tokens_seen
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
