"""bench/guard.py end to end at a tiny size: two real `corral serve` processes (plain, then --guard)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_guard_bench_runs_both_servers_and_reports_the_added_time(tmp_path):
    out = tmp_path / "guard.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "guard.py"), "--requests", "1", "--max-tokens", "8",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["plain"]["chunks"] > 0 and result["guard"]["chunks"] > 0
    assert result["plain"]["finish"] == ["length"] and result["guard"]["finish"] == ["length"]
    assert "guard adds" in done.stdout and result["guard"]["moderation_ms"] > 0
