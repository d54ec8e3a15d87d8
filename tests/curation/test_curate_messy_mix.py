"""The must-shows on the labelled mix (data/web/messy_mix.jsonl, README there): each family of steps
alone, so one family's drops don't hide another's, then the whole web pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.config import from_dict
from corral.data.executor import curate, run_local
from corral.data.labelled import score
from corral.data.pipeline import CurateConfig, load_config

ROOT = Path(__file__).parents[2]
MIX = ROOT / "data/web/messy_mix.jsonl"
HEURISTICS = [{"kind": k} for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")]


def run(tmp_path: Path, steps: list[dict]) -> dict:
    config = from_dict(CurateConfig, {"input": {"paths": [str(MIX)]}, "output": {"dir": str(tmp_path / "out")},
                                      "steps": steps})
    curate(config, run_local(1))
    exclusions = [json.loads(line) for line in (tmp_path / "out/exclusions/shard-00000.jsonl").open()]
    return score(MIX, exclusions)


def test_dedup_finds_every_exact_and_near_duplicate_pair_without_unrelated_drops(tmp_path):
    result = run(tmp_path, [{"kind": "exact_dedup"}, {"kind": "minhash_dedup"}])
    assert result["exact_duplicates"] == {"found": 15, "total": 15}
    near = result["near_duplicates"]
    assert near["total"] == 5 and near["found"] / near["total"] >= 0.95
    assert result["dedup_drops_of_unrelated"] == 0
    assert result["originals_dropped_as_unrelated_dup"] == 0


def test_language_drops_all_non_english_losing_at_most_two_english(tmp_path):
    result = run(tmp_path, [{"kind": "language", "languages": ["en"]}])
    assert result["non_english"]["dropped"] == 40
    assert result["english_lost_to_language"] <= 2


def test_heuristics_drop_every_synthetic_junk_document(tmp_path):
    result = run(tmp_path, HEURISTICS)
    assert result["junk"]["dropped"] == result["junk"]["total"] == 10


def test_web_pipeline_report_counts_every_step_consistently(tmp_path):
    config = load_config(ROOT / "configs/curate/web.toml", [f"--output.dir={tmp_path / 'out'}"])
    report = curate(config, run_local(1))
    steps = list(report["steps"].values())
    assert steps[0]["seen"] == 215
    for before, after in zip(steps, steps[1:]):
        assert after["seen"] == before["kept"]  # each step sees exactly what the previous one kept
    for s in steps:
        assert s["seen"] == s["kept"] + sum(s["dropped"].values())
    kept = [json.loads(line) for line in (tmp_path / "out/shards/shard-00000.jsonl").open()]
    assert len(kept) == steps[-1]["kept"]
    assert (tmp_path / "out/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 01_language |" in (tmp_path / "out/report.md").read_text()


@pytest.mark.parametrize("step, match", [('kind = "nope"', r"steps\[0\]\.kind"),
                                         ('kind = "c4"\nmin_sentence = 3', r"steps\[0\]\.min_sentence")])
def test_config_rejects_unknown_step_or_key(tmp_path, step, match):
    from corral.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text(f'[input]\npaths = ["{MIX}"]\n[output]\ndir = "{tmp_path}"\n[[steps]]\n{step}\n')
    with pytest.raises(ConfigError, match=match):
        load_config(path)
