"""bench/eval.py runs end to end on a tiny size (Corral's side; the peers' sides need minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_eval_bench_prints_examples_per_second(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "eval.py"), "--limit", "2", "--threads", "1",
                           "--sides", "corral", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ex/s wall" in proc.stdout
    result = json.loads(out.read_text())["results"]["corral"]
    assert result["examples_per_s"] > 0 and 0 <= result["acc"] <= 1
