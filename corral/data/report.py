"""The curation report: per step, documents seen, kept, dropped by reason and changed, summed over
shards; written as report.json, a Markdown table (report.md) and a bar chart (report.png). Nothing in
it depends on timing or worker count, so two runs of one config give identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from corral.data.documents import StepStats
from corral.data.executor import _atomic_write, _Paths, shard_name
from corral.data.pipeline import CurateConfig, stages


def merged_stats(config: CurateConfig, n_shards: int) -> dict[str, StepStats]:
    paths = _Paths(config.output.dir)
    total: dict[str, StepStats] = {}
    for s in range(len(stages(config))):
        for shard in range(n_shards):
            raw = json.loads((paths.stage(s) / f"stats-{shard:05d}.json").read_text())
            for name, stats in raw.items():
                total.setdefault(name, StepStats()).merge(StepStats.from_dict(stats))
    return dict(sorted(total.items(), key=lambda kv: ("" if kv[0] == "reader" else kv[0])))


def write_report(config: CurateConfig, n_shards: int) -> dict:
    """Merge every shard's stats and exclusions into the output directory; returns the report."""
    paths = _Paths(config.output.dir)
    if config.output.exclusions:
        for shard in range(n_shards):
            parts = [(paths.stage(s) / f"exclusions-{shard:05d}.jsonl").read_bytes()
                     for s in range(len(stages(config)))]
            _atomic_write(paths.out / "exclusions" / shard_name(shard), b"".join(parts))
    stats = merged_stats(config, n_shards)
    report = {"shards": n_shards, "steps": {name: s.to_dict() for name, s in stats.items()}}
    _atomic_write(paths.out / "report.json", (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    _atomic_write(paths.out / "report.md", markdown(stats).encode())
    plot(stats, paths.out / "report.png")
    return report


def markdown(stats: dict[str, StepStats]) -> str:
    lines = ["| step | seen | kept | dropped (by reason) | changed |", "| --- | ---: | ---: | --- | --- |"]
    for name, s in stats.items():
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(s.dropped.items())) or "-"
        changed = ", ".join(f"{r} {n}" for r, n in sorted(s.changed.items())) or "-"
        lines.append(f"| {name} | {s.seen} | {s.kept} | {dropped} | {changed} |")
    return "\n".join(lines) + "\n"


def plot(stats: dict[str, StepStats], path: Path) -> None:
    """Kept and dropped documents per step as stacked horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    kept = [stats[n].kept for n in names]
    dropped = [sum(stats[n].dropped.values()) for n in names]
    ax.barh(names, kept, color="#4c72b0", label="kept")
    ax.barh(names, dropped, left=kept, color="#dd8452", label="dropped")
    ax.set_xlabel("documents")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
