"""`corral quantize` against llama.cpp's quantizer on a Llama-shaped model: time, and every tensor's type and bytes.

    python bench/quantize.py                       # Llama 3.2 1B shape, random F16 weights, Q4_K_M
    python bench/quantize.py --shape tiny --mix Q6_K --workdir /tmp/qbench

The source is a GGUF of random float16 weights (N(0, 0.02), seeded) written by Corral's exporter
and kept in --workdir for later runs. llama.cpp quantizes it with ``llama_model_quantize`` (llama-cpp-python,
nthread = --threads), then ``python -m corral.cli quantize SRC --type MIX -o OUT`` runs in a child process,
one after the other. The script prints both wall times, their ratio, and how many tensors differ in type
or bytes (0 expected: tests/checkpoint/test_kquants.py). On a shared machine the times are noisy; the
ratio of two runs made back to back is the figure to read.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corral.checkpoint.base import weight_shapes  # noqa: E402
from corral.checkpoint.gguf_quant import MIXES  # noqa: E402
from corral.checkpoint.gguf_reader import read_gguf  # noqa: E402
from corral.checkpoint.gguf_write import export_gguf  # noqa: E402
from corral.model.config import ModelConfig  # noqa: E402

SHAPES = {
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden_dim=8192,
                      max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True),
    "tiny": ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=8192, ffn_hidden_dim=1536,
                        max_seq_len=2048, tie_embeddings=True),
}


def source_gguf(workdir: Path, shape: str) -> Path:
    src = workdir / f"{shape}-f16.gguf"
    if not src.exists():
        g = torch.Generator().manual_seed(0)
        state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in weight_shapes(SHAPES[shape]).items()}
        export_gguf(SHAPES[shape], state, src, qtype="F16")
    return src


def llama_cpp_quantize(src: Path, dest: Path, mix: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix][1])
    params.nthread = threads
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    return time.perf_counter() - start


def corral_quantize(src: Path, dest: Path, mix: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "corral.cli", "quantize", str(src), "--type", mix, "-o", str(dest)],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def differing(a_path: Path, b_path: Path) -> tuple[int, list[str]]:
    with read_gguf(a_path) as a, read_gguf(b_path) as b:
        def same(name: str) -> bool:
            other = b.tensors.get(name)
            return other is not None and other.ggml_type == a.tensors[name].ggml_type and np.array_equal(
                a.raw(name), b.raw(name))

        return len(a.tensors), [n for n in a.tensors if not same(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--mix", choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"], default="Q4_K_M")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's nthread")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/corral-quantize-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = source_gguf(args.workdir, args.shape)
    theirs, ours = args.workdir / f"llamacpp-{args.mix}.gguf", args.workdir / f"corral-{args.mix}.gguf"
    t_theirs = llama_cpp_quantize(src, theirs, args.mix, args.threads)
    t_ours = corral_quantize(src, ours, args.mix)
    n, bad = differing(theirs, ours)
    print(f"{args.shape} {args.mix}: llama.cpp {t_theirs:.1f} s ({args.threads} threads), corral {t_ours:.1f} s "
          f"({os.cpu_count()} CPUs), ratio {t_ours / t_theirs:.2f}; {len(bad)} of {n} tensors differ {bad[:3]}")


if __name__ == "__main__":
    main()
