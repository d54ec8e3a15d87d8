"""Running a curation config: shard tasks, barriers, completion markers, executors.

Layout under output.dir::

    shards/shard-00000.jsonl       the curated documents of input file 0 (one JSON object a line)
    exclusions/shard-00000.jsonl   every dropped document: {"step", "reason", "id", "text", "metadata"}
    report.json, report.md, report.png
    work/stage-1/...               intermediate shards, signatures, stats, markers (kept for resumption)

A task is (stage, shard). It writes its files under temporary names, renames them, and writes its
marker last, so a task killed at any point is simply redone; a rerun skips every task with a marker.
Each task depends only on its inputs and a barrier resolves in (shard, position) order, so the output is
the same byte for byte for any executor and any number of workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from corral.config import from_dict
from corral.data.documents import Document, ExclusionWriter, StepStats, run_steps
from corral.data.pipeline import CurateConfig, GlobalDedup, build_step, make_reader, stages, step_key
from corral.data.readers import expand_sources
from corral.data.semdedup import Embed

Task = tuple[dict, int, int, "Embed | None"]
"""(config as a plain dict, stage, shard, embedding function): all a worker needs, picklable (the
function by reference: a module-level function)."""
RunTasks = Callable[[Callable[[Task], None], list[Task], str], None]
"""(task function, tasks, progress label) -> None once all are done: what an executor provides."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.jsonl"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            raw = json.loads(line)
            yield Document(raw["text"], raw["id"], raw["metadata"])


class _Paths:
    def __init__(self, out: str | Path):
        self.out = Path(out)

    def stage(self, s: int) -> Path:
        return self.out / "work" / f"stage-{s}"

    def marker(self, s: int, shard: int) -> Path:
        return self.stage(s) / f"done-{shard:05d}"

    def resolved(self, s: int) -> Path:
        return self.stage(s) / "resolved"


def run_task(task: Task) -> None:
    """One shard through one stage: read (or take the previous stage's survivors), run the steps, write."""
    raw, s, shard, embed = task
    config = from_dict(CurateConfig, raw, what="curate config")
    paths = _Paths(config.output.dir)
    local, barrier = stages(config)[s]
    steps = [build_step(config.steps[i], i, embed) for i in local]
    stats: dict[str, StepStats] = {}
    files = expand_sources(config.input.paths)
    if s == 0:
        reader = make_reader(config.input)
        docs: Iterator[Document] = reader.read(files[shard])
        stats["reader"] = reader.stats
    else:
        docs = _survivors(paths, s - 1, shard, config, stats)
    exclusions_path = paths.stage(s) / f"exclusions-{shard:05d}.jsonl"
    final = barrier is None
    out_path = (paths.out / "shards" if final else paths.stage(s)) / shard_name(shard)
    with ExclusionWriter(exclusions_path.with_suffix(".tmp")) as writer:
        kept = list(run_steps(steps, _exclude_into(docs, writer, stats), shard, len(files), writer))
    os.replace(exclusions_path.with_suffix(".tmp"), exclusions_path)
    _atomic_write(out_path, "".join(d.to_json() + "\n" for d in kept).encode())
    if not final:
        sig = build_step(config.steps[barrier], barrier, embed)
        assert isinstance(sig, GlobalDedup)
        signatures = sig.signatures([d.text for d in kept]) if kept else np.zeros((0, 1), np.uint32)
        np.save(paths.stage(s) / f"sig-{shard:05d}.npy", signatures)
    stats.update({step.name: step.stats for step in steps})
    _atomic_write(paths.stage(s) / f"stats-{shard:05d}.json",
                  json.dumps({k: v.to_dict() for k, v in stats.items()}).encode())
    _atomic_write(paths.marker(s, shard), b"")


def _exclude_into(docs: Iterator[Document], writer: ExclusionWriter, stats: dict) -> Iterator[Document]:
    """Documents a barrier already marked as duplicates carry metadata["_drop"]; they leave here."""
    for doc in docs:
        drop = doc.metadata.pop("_drop", None)
        if drop is None:
            yield doc
        else:
            step, dup_of = drop
            stats[step].dropped["duplicate"] += 1
            doc.metadata["duplicate_of"] = dup_of
            writer(step, doc, "duplicate")


def _survivors(paths: _Paths, s: int, shard: int, config: CurateConfig, stats: dict) -> Iterator[Document]:
    """The previous stage's kept documents, the barrier's duplicates marked for dropping."""
    _, barrier = stages(config)[s]
    name = step_key(barrier, config.steps[barrier]["kind"])
    dups = json.loads((paths.stage(s) / f"dups-{shard:05d}.json").read_text())
    stats[name] = step_stats = StepStats()
    return _marked(paths, s, shard, name, dups, step_stats)


def _marked(paths: _Paths, s: int, shard: int, name: str, dups: dict, step_stats: StepStats) -> Iterator[Document]:
    for position, doc in enumerate(_read_jsonl(paths.stage(s) / shard_name(shard))):
        step_stats.seen += 1
        if str(position) in dups:
            doc.metadata["_drop"] = (name, dups[str(position)])
        else:
            step_stats.kept += 1
        yield doc


def resolve_barrier(config: CurateConfig, s: int, n_shards: int, embed: Embed | None) -> None:
    """All shards' signatures in order -> each shard's {position: id of the kept twin}."""
    paths = _Paths(config.output.dir)
    if paths.resolved(s).exists():
        return
    _, barrier = stages(config)[s]
    step = build_step(config.steps[barrier], barrier, embed)
    assert isinstance(step, GlobalDedup)
    sigs, where = [], []
    for shard in range(n_shards):
        sig = np.load(paths.stage(s) / f"sig-{shard:05d}.npy")
        ids = [d.id for d in _read_jsonl(paths.stage(s) / shard_name(shard))]
        sigs += list(sig)
        where += [(shard, pos, doc_id) for pos, doc_id in enumerate(ids)]
    dup_of = step.resolve(np.stack(sigs)) if sigs else []
    per_shard: list[dict[str, str]] = [{} for _ in range(n_shards)]
    for (shard, pos, _), target in zip(where, dup_of):
        if target >= 0:
            per_shard[shard][str(pos)] = where[target][2]
    for shard, dups in enumerate(per_shard):
        _atomic_write(paths.stage(s) / f"dups-{shard:05d}.json", json.dumps(dups, sort_keys=True).encode())
    _atomic_write(paths.resolved(s), b"")


def run_local(workers: int) -> RunTasks:
    """Tasks in this process (workers=1) or a multiprocessing pool; a progress bar on stderr."""
    from tqdm import tqdm

    def run(fn: Callable[[Task], None], tasks: list[Task], label: str) -> None:
        bar = tqdm(total=len(tasks), desc=label, unit="shard", disable=None)
        if workers <= 1:
            for task in tasks:
                fn(task)
                bar.update()
        else:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(fn, tasks):
                    bar.update()
        bar.close()
    return run


def curate(config: CurateConfig, run_tasks: RunTasks, embed: Embed | None = None) -> dict:
    """Run every stage (skipping finished tasks), then write the report; returns the report."""
    from corral.data.report import write_report

    raw = asdict(config)
    n_shards = len(expand_sources(config.input.paths))
    paths = _Paths(config.output.dir)
    plan = stages(config)
    for s, (_, barrier) in enumerate(plan):
        todo = [(raw, s, shard, embed) for shard in range(n_shards) if not paths.marker(s, shard).exists()]
        if todo:
            run_tasks(run_task, todo, f"stage {s + 1}/{len(plan)}")
        if barrier is not None:
            resolve_barrier(config, s, n_shards, embed)
    return write_report(config, n_shards)
