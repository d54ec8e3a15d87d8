"""bench/curation.py end to end at a tiny size: both sides run and the ratio is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_curation_bench_runs_both_sides_at_tiny_size():
    pytest.importorskip("datatrove")
    out = subprocess.run([sys.executable, str(ROOT / "bench/curation.py"), "--docs", "60", "--shards", "2",
                          "--workers", "1", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["docs"] == 60 and result["corral_docs_per_s"] > 0 and result["datatrove_docs_per_s"] > 0
