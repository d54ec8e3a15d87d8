"""Issue 14 item 14 (RELIABILITY.md 45): a killed `corral quantize` leaves its scratch folder; `corral verify`
reports it and garbage collection removes it, while a live command's folder is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.cli import main
from corral.llm import default_model_path
from corral.store import Store
from corral.store.scratch import OWNER, scratch_dir, stale_scratch

ROOT = Path(__file__).parents[2]


def _scratch(store: Store) -> list[Path]:
    return sorted(store.models.glob(".quantize-*")) if store.models.is_dir() else []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow  # ~10 s: quantizes the embedded 135M model until it is killed
def test_killed_quantize_leaves_scratch_that_verify_reports_and_gc_removes(store, home, capsys):
    """Item 14: kill -9 during quantize -> verify lists the folder (exit 0), the next GC frees it."""
    env = {**os.environ, "CORRAL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "corral", "quantize", str(default_model_path()), "--type", "Q8_0",
                             "--name", "smol:q8"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.glob(".model.gguf.*.tmp") for p in _scratch(store)):  # writing its output
            assert proc.poll() is None and time.monotonic() < deadline, "quantize ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = _scratch(store)
    assert json.loads((left / OWNER).read_text())["pid"] == proc.pid
    assert main(["verify"]) == 0
    out, err = capsys.readouterr()
    assert f"leftover models/{left.name}" in out and "1 leftovers" in err
    assert store.collect_garbage() > 0
    assert _scratch(store) == [] and store.leftovers() == []


def test_gc_keeps_a_live_commands_scratch_and_removes_a_dead_ones(store):
    """Item 14: the owner's pid decides: alive (this process) is kept, a finished pid is collected."""
    with scratch_dir(store.models, "quantize") as live:
        (live / "model.gguf").write_bytes(b"x" * 1000)
        dead = store.models / ".quantize-dead"
        dead.mkdir()
        (dead / OWNER).write_text(json.dumps({"pid": _dead_pid(), "started": None, "host": os.uname().nodename}))
        (dead / "f32.gguf").write_bytes(b"y" * 5000)
        assert stale_scratch(store.models) == [dead]
        assert store.collect_garbage() >= 5000
        assert live.is_dir() and not dead.exists()
    assert not live.exists()  # its owner cleans up on exit


def test_scratch_without_owner_is_stale_only_after_an_hour(store):
    """Item 14: a folder from an older Corral (no owner file) waits an hour, then goes."""
    old = store.models / ".create-old"
    old.mkdir(parents=True)
    assert stale_scratch(store.models) == []
    an_hour_ago = time.time() - 3700
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert stale_scratch(store.models) == [old]
    store.collect_garbage()
    assert not old.exists()


def test_reused_pid_does_not_keep_a_dead_commands_scratch(store):
    """Item 14: the owner file records the pid's start time; a live process with that pid but another
    start time is not the owner."""
    stolen = store.models / ".quantize-reused"
    stolen.mkdir(parents=True)
    (stolen / OWNER).write_text(json.dumps({"pid": os.getpid(), "started": "1", "host": os.uname().nodename}))
    assert stale_scratch(store.models) == [stolen]
