"""`corral eval contamination`: which task examples share a word 13-gram with the training data.

The n-gram core is corral.data.ngrams (the curation pipeline uses the same index to drop training
documents). Training sources are text/JSONL files (corral.data.readers) or token shards, decoded with the
Llama 3 tokenizer they were written with and cut into documents at <|end_of_text|>. An example's text is
its prompt and every choice (or the continuation WinoGrande shares); examples shorter than n words cannot
be checked and are counted as such.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.data.ngrams import NgramIndex, ngrams
from corral.data.readers import expand_sources, iter_documents
from corral.data.shards import is_shard, read_shard
from corral.eval import tasks
from corral.eval.tasks import Doc, Task


def train_documents(sources: list[str]) -> Iterator[str]:
    shard_tokenizer = None
    for path in expand_sources(sources):
        if not is_shard(path):
            yield from iter_documents(path)
            continue
        if shard_tokenizer is None:
            from corral.tokenizer import load_llama3_tokenizer

            shard_tokenizer = load_llama3_tokenizer()
        ids = read_shard(path).tolist()
        eos, start = shard_tokenizer.eos_id, 0
        for i, token in enumerate(ids + [eos]):
            if token == eos:
                body = [t for t in ids[start:i] if t != shard_tokenizer.bos_id]
                if body:
                    yield shard_tokenizer.decode(body)
                start = i + 1


def example_text(doc: Doc) -> str:
    return " ".join([doc.query, *doc.choices, doc.continuation, doc.target if not doc.choices else ""])


def contamination_report(train: list[str], task_list: list[Task], *, n: int = 13,
                         data_dir: str | Path | None = None) -> dict[str, Any]:
    index = NgramIndex(n)
    for document in train_documents(train):
        index.add(document, "train")
    rows = []
    for task in task_list:
        docs = tasks.load_docs(task, data_dir)
        texts = [example_text(d) for d in docs]
        hit = [i for i, t in enumerate(texts) if index.matches(t)]
        short = sum(not ngrams(t, n) for t in texts)
        rows.append({"task": task.name, "examples": len(docs), "contaminated": len(hit),
                     "fraction": len(hit) / len(docs) if docs else 0.0, "too_short": short, "examples_hit": hit[:50]})
    return {"n": n, "train": [str(s) for s in train], "train_ngrams": len(index), "tasks": rows}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['n']}-gram overlap with {', '.join(report['train'])} ({report['train_ngrams']} n-grams)", "",
             "| task | examples | contaminated | fraction | too short to check |", "|---|---:|---:|---:|---:|"]
    for row in report["tasks"]:
        lines.append(f"| {row['task']} | {row['examples']} | {row['contaminated']} | {row['fraction']:.4f} "
                     f"| {row['too_short']} |")
    return "\n".join(lines)
