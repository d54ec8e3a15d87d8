"""An injected hang and an injected crash each end in a torchrun restart that finishes the run (RELIABILITY.md 34)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_fixtures import REPO, tiny_overrides, write_tiny_data

from corral.train.failure import WATCHDOG_EXIT_CODE
from corral.train.loop import read_metrics


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_injected_fault_is_restarted_by_torchrun_and_run_finishes(tmp_path, fault):
    write_tiny_data(tmp_path)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, tmp_path, steps=5, **{"checkpoint.every": 2, f"fault.{fault}_at_step": 4,
                                                               "failure.watchdog_timeout_s": 6.0})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "--max-restarts=2", "-m", "corral.train.pretrain", "-", *overrides, "--resume", "auto"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2  # restarted from the last committed checkpoint
    assert sorted(read_metrics(run_dir / "metrics.jsonl")) == [1, 2, 3, 4, 5]
    assert (run_dir / "checkpoints" / "step_00000005" / "COMMIT").exists()
    if fault == "hang":
        dump = (run_dir / "watchdog_rank0.txt").read_text()
        assert f"exiting with code {WATCHDOG_EXIT_CODE}" in dump
        assert "before_step" in dump  # the hung main thread's stack, where the fault sleeps
    else:
        assert "injected crash at step 4" in done.stderr
