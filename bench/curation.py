"""Documents/s through reader -> Gopher quality -> Gopher repetition -> C4 -> MinHash, Corral vs datatrove.

    python bench/curation.py                          # 6,000 documents in 6 shards, 2 workers
    python bench/curation.py --docs 600 --shards 2 --workers 1 --json

Both sides read the same JSONL shards (data/web/c4_demo.jsonl and messy_mix.jsonl's English documents,
repeated to --docs) with the same number of tasks and worker processes, one after the other in this run.
datatrove 0.10.1 runs a stdlib-json JSONL reader step (its JsonlReader needs orjson, not installed),
GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter and
MinhashDedupSignature (14 x 8 hashes, its default) under LocalPipelineExecutor. Its English word
tokenizer needs spaCy (not installed, and it would fetch a model), so both sides split words on
whitespace: datatrove gets a WordTokenizer that does so. Corral runs ``corral curate``'s executor on
gopher_quality, gopher_repetition, c4 and minhash_dedup (20 x 5 hashes), which also clusters the
signatures and writes the deduplicated shards and the report: more work than datatrove's signature
stage, so the ratio is conservative. Thresholds are each library's defaults (the papers' values;
datatrove's C4 counts 5 lines as its sentence minimum, Corral 3 sentences).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(folder: Path, docs: int, shards: int) -> int:
    """--docs English documents as `shards` JSONL files; returns the count written."""
    texts = [json.loads(line)["text"] for line in (REPO / "data/web/c4_demo.jsonl").open()]
    for line in (REPO / "data/web/messy_mix.jsonl").open():
        row = json.loads(line)
        if row["labels"]["lang"] == "en":
            texts.append(row["text"])
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"part-{i:03d}.jsonl", "w") for i in range(shards)]
    for i in range(docs):
        files[i % shards].write(json.dumps({"id": f"d{i}", "text": texts[i % len(texts)]}) + "\n")
    for f in files:
        f.close()
    return docs


def run_corral(inputs: Path, out: Path, workers: int) -> float:
    from corral.config import from_dict
    from corral.data.executor import curate, run_local
    from corral.data.pipeline import CurateConfig

    steps = [{"kind": k} for k in ("gopher_quality", "gopher_repetition", "c4", "minhash_dedup")]
    config = from_dict(CurateConfig, {"input": {"paths": [str(inputs)]}, "output": {"dir": str(out)}, "steps": steps})
    started = time.perf_counter()
    curate(config, run_local(workers))
    return time.perf_counter() - started


def run_datatrove(inputs: Path, out: Path, workers: int, shards: int) -> float:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [line for line in text.splitlines() if line.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, start = [], 0
            for line in text.splitlines(keepends=True):
                spans.append((start, start + len(line)))
                start += len(line)
            return spans

    files = sorted(inputs.iterdir())

    def read(data, rank: int = 0, world_size: int = 1):  # its JsonlReader needs orjson (not installed)
        with open(files[rank]) as f:
            for line in f:
                row = json.loads(line)
                yield Document(text=row["text"], id=row["id"])

    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    # datatrove hands str to xxhash, which this xxhash release refuses ("Strings must be encoded"): encode
    # first, the smallest change that keeps its default hash (forked workers inherit the patch).
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    words = Whitespace("en")
    pipeline = [read, GopherQualityFilter(language=words),
                GopherRepetitionFilter(language=words), C4QualityFilter(language=words),
                MinhashDedupSignature(str(out / "sigs"), config=MinhashConfig(), language=words)]
    executor = LocalPipelineExecutor(pipeline, tasks=shards, workers=workers, logging_dir=str(out / "logs"),
                                     start_method="fork")
    started = time.perf_counter()
    executor.run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=6000)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="run both this many times, alternating which goes first; keep each side's best time "
                        "(the least disturbed by other load on a shared machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    corral_s = datatrove_s = float("inf")
    with tempfile.TemporaryDirectory(prefix="corral-bench-curation-") as tmp:
        tmp_path = Path(tmp)
        n = make_inputs(tmp_path / "in", args.docs, args.shards)
        for r in range(args.rounds):
            for name in ["corral", "datatrove"][:: 1 if r % 2 == 0 else -1]:
                out = tmp_path / f"{name}-{r}"
                seconds = (run_corral(tmp_path / "in", out, args.workers) if name == "corral"
                           else run_datatrove(tmp_path / "in", out, args.workers, args.shards))
                if name == "corral":
                    corral_s = min(corral_s, seconds)
                else:
                    datatrove_s = min(datatrove_s, seconds)
    result = {"docs": n, "shards": args.shards, "workers": args.workers, "rounds": args.rounds,
              "corral_docs_per_s": round(n / corral_s, 1), "datatrove_docs_per_s": round(n / datatrove_s, 1),
              "ratio": round(datatrove_s / corral_s, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{n} documents, {args.shards} shards, {args.workers} workers")
        print(f"corral    {result['corral_docs_per_s']:>9.1f} docs/s")
        print(f"datatrove {result['datatrove_docs_per_s']:>9.1f} docs/s")
        print(f"ratio     {result['ratio']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
