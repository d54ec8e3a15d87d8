"""bench/soak.py for 12 seconds (issue 14 "Must show", RELIABILITY.md 28): every route against a real
`corral serve` on port 0; valid requests never 5xx, running/queued return to 0, descriptors return."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow  # a server start, two model loads and 12 s of mixed traffic
def test_short_soak_mixes_every_route_and_passes_its_checks(tmp_path):
    out = tmp_path / "soak.json"
    # RSS is the 30-minute run's check: a 12 s run loads its second model after the baseline is taken.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.2", "--workers", "3",
                           "--json", str(out), "--rss-slack-mb", "4096"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert out.is_file(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "crashed" not in report["failed"], (report.get("error"), report.get("server_log_tail"))
    checks = {name: check["value"] for name, check in report["checks"].items()}
    assert checks["valid_5xx"] == 0 and checks["valid_transport_errors"] == 0, report["failures"]
    assert checks["running_plus_queued_at_end"] == 0
    assert checks["open_fds_growth"] <= report["checks"]["open_fds_growth"]["limit"]
    routes = {key.split()[1] for key in report["statuses"]}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= routes  # each client's first action
    assert proc.returncode == (1 if report["failed"] else 0), proc.stderr
