"""Results: the JSON report on disk, its markdown table, and `corral eval compare` (table + bar plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.errors import CorralError, EvalDataError

ROW_FIELDS = ("task", "metric", "value", "stderr", "n")


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"model: {report['model']}  (seed {report['seed']}, {report['duration']:.1f} s)", "",
             "| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for row in report["results"]:
        lines.append(f"| {row['task']} | {row['metric']} | {row['value']:.4f} | {row['stderr']:.4f} | {row['n']} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def read_report(path: str | Path) -> dict[str, Any]:
    """A results JSON written by `corral eval`; anything else is an EvalDataError naming the file."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError("results file not found", path=str(path), line=0) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"not a results JSON ({e.__class__.__name__})", path=str(path), line=0) from None
    rows = report.get("results") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(ROW_FIELDS) <= set(r) for r in rows):
        raise EvalDataError(f"not a results JSON: needs 'results' rows with {', '.join(ROW_FIELDS)}",
                            path=str(path), line=0, field="results")
    return report


def compare_table(reports: list[dict[str, Any]], labels: list[str]) -> tuple[list[tuple[str, str]], str]:
    """(the (task, metric) keys in order, a markdown table with one column per report)."""
    keys: list[tuple[str, str]] = []
    for report in reports:
        keys += [(r["task"], r["metric"]) for r in report["results"] if (r["task"], r["metric"]) not in keys]
    values = [{(r["task"], r["metric"]): r for r in report["results"]} for report in reports]
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for key in keys:
        cells = [f"{v[key]['value']:.4f} ± {v[key]['stderr']:.4f}" if key in v else "–" for v in values]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return keys, "\n".join(lines)


def compare_plot(reports: list[dict[str, Any]], labels: list[str], keys: list[tuple[str, str]], path: Path) -> Path:
    """Grouped bars (one group per task/metric, one bar per report) with stderr whiskers, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    values = [{(r["task"], r["metric"]): r for r in report["results"]} for report in reports]
    width = 0.8 / max(len(reports), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(reports)) / 2), 4))
    for i, (label, table) in enumerate(zip(labels, values)):
        xs = [k + i * width for k in range(len(keys))]
        ys = [table[key]["value"] if key in table else 0.0 for key in keys]
        errs = [table[key]["stderr"] if key in table else 0.0 for key in keys]
        ax.bar(xs, ys, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks([k + width * (len(reports) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{t}\n{m}" for t, m in keys], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_ylabel("value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(paths: list[str], plot: str | Path) -> str:
    if len(paths) < 1:
        raise CorralError("compare needs at least one results JSON")
    reports = [read_report(p) for p in paths]
    labels = [f"{r['model']} ({Path(p).stem})" for r, p in zip(reports, paths)]
    keys, table = compare_table(reports, labels)
    compare_plot(reports, labels, keys, Path(plot))
    return table
