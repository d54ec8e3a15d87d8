"""Same output byte for byte from every executor and worker count, and after a kill -9 and a rerun."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).parents[2]
MIX = ROOT / "data/web/messy_mix.jsonl"
PIPELINE = """
[[steps]]
kind = "language"
[[steps]]
kind = "gopher_repetition"
[[steps]]
kind = "gopher_quality"
[[steps]]
kind = "line_dedup"
[[steps]]
kind = "exact_dedup"
[[steps]]
kind = "pii"
[[steps]]
kind = "minhash_dedup"
"""


def make_inputs(tmp_path: Path, copies: int = 1) -> Path:
    """messy_mix split into 4 shards (plain, gzip, zstd, plain), repeated ``copies`` times."""
    lines = MIX.read_bytes().splitlines(keepends=True)
    folder = tmp_path / "in"
    folder.mkdir()
    for c in range(copies):
        for i in range(4):
            part = b"".join(lines[i::4])
            name = folder / f"part-{c:02d}-{i}"
            name.write_bytes(gzip.compress(part, mtime=0) if i == 1 else
                             zstandard.ZstdCompressor().compress(part) if i == 2 else part)
    return folder


def write_config(tmp_path: Path, inputs: Path, out: str) -> Path:
    path = tmp_path / f"{out}.toml"
    path.write_text(f'[input]\npaths = ["{inputs}"]\n[output]\ndir = "{tmp_path / out}"\n{PIPELINE}')
    return path


def curate(config: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", "curate", str(config), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def curate_here(config: Path) -> None:
    """The reference run, in this process (one interpreter start less)."""
    from corral.data.executor import curate as run
    from corral.data.executor import run_local
    from corral.data.pipeline import load_config

    run(load_config(config), run_local(1))


def outputs(out: Path) -> dict[str, bytes]:
    """Every file a run delivers (not its work/ directory)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "work" not in p.relative_to(out).parts}


def test_local_workers_one_and_two_give_identical_output(tmp_path):
    inputs = make_inputs(tmp_path)
    curate_here(write_config(tmp_path, inputs, "one"))
    two = curate(write_config(tmp_path, inputs, "two"), "--executor", "local", "--workers", "2")
    assert two.returncode == 0, two.stderr
    a, b = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len([k for k in a if k.startswith("shards/")]) == 4
    assert a == b


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_local_output(tmp_path):
    pytest.importorskip("ray")
    inputs = make_inputs(tmp_path)
    curate_here(write_config(tmp_path, inputs, "local"))
    ray = curate(write_config(tmp_path, inputs, "ray"), "--executor", "ray", "--workers", "2")
    assert ray.returncode == 0, ray.stderr
    assert outputs(tmp_path / "local") == outputs(tmp_path / "ray")


def test_kill_nine_mid_run_then_rerun_gives_the_uninterrupted_output(tmp_path):
    inputs = make_inputs(tmp_path, copies=3)  # 12 shards, so a kill lands mid-run
    curate_here(write_config(tmp_path, inputs, "ref"))
    config = write_config(tmp_path, inputs, "killed")
    stage = tmp_path / "killed/work/stage-0"
    proc = subprocess.Popen([sys.executable, "-m", "corral", "curate", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(stage.glob("done-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in stage.glob("done-*")}
    assert 0 < len(finished) < 12 and not (tmp_path / "killed/report.json").exists()
    rerun = curate(config)
    assert rerun.returncode == 0, rerun.stderr
    assert {n: (stage / n).stat().st_mtime_ns for n in finished} == finished  # finished shards not redone
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "ref")
