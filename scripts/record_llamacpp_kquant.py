"""Record llama.cpp's teacher-forced top-1 tokens on the Llama-3.2-1B-shaped Q4_K_M file (bench/kquant_files.py).

    python scripts/record_llamacpp_kquant.py [--dir /tmp/corral-1b] [--out tests/golden/llama1b_q4km_llamacpp_top1.json]

Random weights still make a deterministic argmax. The golden holds token ids only: the input sequence
and llama.cpp's argmax after each position, plus the file's size and tensor-data digest so the test knows
it is looking at the same file. tests/e2e/test_kquant_llamacpp.py holds Corral to >= 95% agreement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from kquant_files import make_files  # noqa: E402

N_TOKENS = 256


def file_digest(path: Path) -> str:
    """sha256 of the file's last 64 MiB (tensor data: it differs whenever the weights do), short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (64 << 20)))
        return hashlib.sha256(f.read()).hexdigest()[:16]


def input_ids(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [128000] + [rng.randrange(0, 128000) for _ in range(N_TOKENS - 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/corral-1b"))
    p.add_argument("--out", type=Path, default=ROOT / "tests/golden/llama1b_q4km_llamacpp_top1.json")
    args = p.parse_args(argv)
    import llama_cpp
    import numpy as np

    path = make_files(args.dir, "1b", ["Q4_K_M"])["Q4_K_M"]
    ids = input_ids()
    llm = llama_cpp.Llama(str(path), n_ctx=N_TOKENS + 16, n_threads=2, n_batch=512, logits_all=True, verbose=False)
    llm.eval(ids)
    top1 = np.asarray(llm.scores[:len(ids)]).argmax(-1).tolist()
    args.out.write_text(json.dumps({
        "file": {"name": path.name, "bytes": path.stat().st_size, "digest": file_digest(path)},
        "llama_cpp": llama_cpp.__version__, "input_ids": ids, "top1": top1}) + "\n")
    print(f"wrote {args.out} ({len(ids)} positions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
