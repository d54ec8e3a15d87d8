"""Precision and recall per label on data/web/messy_mix.jsonl: each family of steps alone, then the whole
web pipeline (configs/curate/web.toml). Prints the Markdown tables of docs/curation.md.

    python scripts/curation_messy_mix_report.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corral.config import from_dict  # noqa: E402
from corral.data.executor import curate, run_local  # noqa: E402
from corral.data.labelled import score  # noqa: E402
from corral.data.pipeline import CurateConfig, load_config  # noqa: E402

MIX = ROOT / "data/web/messy_mix.jsonl"
RUNS = {
    "dedup (exact + minhash)": [{"kind": "exact_dedup"}, {"kind": "minhash_dedup"}],
    "language": [{"kind": "language"}],
    "heuristics (gopher rep + quality, c4, fineweb)": [{"kind": k} for k in
                                                       ("gopher_repetition", "gopher_quality", "c4", "fineweb")],
}


def run(out: Path, config: CurateConfig) -> dict:
    curate(config, run_local(1))
    return score(MIX, [json.loads(line) for line in (out / "exclusions/shard-00000.jsonl").open()])


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, steps) in enumerate(RUNS.items()):
            out = Path(tmp) / str(i)
            results[name] = run(out, from_dict(CurateConfig, {"input": {"paths": [str(MIX)]},
                                                              "output": {"dir": str(out)}, "steps": steps}))
        out = Path(tmp) / "web"
        results["whole web pipeline"] = run(out, load_config(ROOT / "configs/curate/web.toml",
                                                             [f"--output.dir={out}"]))
    print("| run | exact pairs | near pairs (J >= 0.8) | dedup drops of unrelated docs | non-English dropped "
          "(recall / precision) | English lost to language ID | junk dropped (recall) | expected_keep docs lost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ne, junk = r["non_english"], r["junk"]
        print(f"| {name} | {r['exact_duplicates']['found']}/{r['exact_duplicates']['total']} | "
              f"{r['near_duplicates']['found']}/{r['near_duplicates']['total']} | {r['dedup_drops_of_unrelated']} | "
              f"{ne['dropped']}/{ne['total']} ({ne['recall']:.2f} / {ne['precision']:.2f}) | "
              f"{r['english_lost_to_language']} | {junk['dropped']}/{junk['total']} ({junk['recall']:.2f}) | "
              f"{r['expected_keep_lost']}/120 |")
    print()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
