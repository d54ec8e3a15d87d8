"""Peak memory of one QLoRA step on a Llama-3.2-1B-shaped model kept in GGUF blocks, against full fp32 fine-tuning.

    python bench/qlora_memory.py                       # the 1B shape: 16 layers, vocab 128256, Q4_0
    python bench/qlora_memory.py --qtype Q4_K --n-layers 4 --vocab 32000

A child process builds the model with random weights, quantized tensor by tensor (in row chunks, so no float
copy of the model ever exists) by Corral's quantizers (corral.checkpoint.gguf_quant); the token table stays in
blocks and, tied as in Llama 3.2 1B, is also the output projection. It then applies LoRA (rank 8 on every
projection of every block) over TiledBlockLinear bases (corral.kernels.qlora) and runs one step: forward,
backward through every quantized layer, AdamW on the adapters. Its peak RSS (getrusage ru_maxrss) is the
figure. The anchor, full fp32 fine-tuning of the same shape, is computed rather than run: parameters x
(4 B weights + 4 B gradients + 8 B Adam moments), activations not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
FULL_FT_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, gradient, Adam's two moments


def _shape(n_layers: int, vocab: int):
    from corral.model.config import PRESETS

    return dataclasses.replace(PRESETS["llama3.2-1b"], n_layers=n_layers, vocab_size=vocab)


def _blocks(shape: tuple[int, int], qtype: str, gen, chunk_rows: int = 2048):
    """Random N(0, 0.02) weight of `shape` as flat GGUF blocks, made `chunk_rows` rows at a time."""
    import numpy as np
    import torch
    from gguf.constants import GGMLQuantizationType

    from corral.checkpoint.gguf_quant import quantize_tensor

    parts = []
    for start in range(0, shape[0], chunk_rows):
        rows = torch.randn(min(chunk_rows, shape[0] - start), shape[1], generator=gen) * 0.02
        parts.append(np.ascontiguousarray(quantize_tensor(rows.numpy(), GGMLQuantizationType[qtype])).view(np.uint8))
    return torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]))


def build_qlora_model(n_layers: int, vocab: int, qtype: str, rank: int):
    """The QLoRA model: blocks for every linear and the (tied) token table, float norms, LoRA adapters."""
    import torch

    from corral.checkpoint.base import weight_shapes
    from corral.kernels.qlora import apply_qlora_base_
    from corral.model.llama import Transformer
    from corral.model.lora import ATTENTION_MLP, apply_lora

    config = _shape(n_layers, vocab)
    gen = torch.Generator().manual_seed(0)
    quantized, dense = {}, {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 2:
            quantized[name] = (_GGML[qtype], _blocks(shape, qtype, gen), shape)
        else:
            dense[name] = torch.ones(shape)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(dense, strict=False, assign=True)
    apply_qlora_base_(model, quantized)
    return apply_lora(model, ATTENTION_MLP, rank=rank, alpha=2 * rank).train()


_GGML = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


def child(args: argparse.Namespace) -> dict:
    """Build, take one QLoRA step, report; runs in its own process so ru_maxrss is this work alone."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_qlora_model(args.n_layers, args.vocab, args.qtype, args.rank)
    built = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    tokens = torch.randint(0, args.vocab, (1, args.seq + 1), generator=torch.Generator().manual_seed(1))
    logits = model(tokens[:, :-1])  # (1, seq, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    first_a = model.layers[0].attention.wq.lora_a.weight
    reached_first_block = bool(model.layers[0].attention.wq.lora_b.weight.grad.abs().sum() > 0)
    opt.step()
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "build_s": built - t0, "step_s": time.perf_counter() - built, "loss": loss.item(),
            "trainable_params": sum(p.numel() for p in trainable), "lora_a_shape": list(first_a.shape),
            "grad_reached_block_0": reached_first_block}


def run(n_layers: int, vocab: int, qtype: str = "Q4_0", rank: int = 8, seq: int = 64, threads: int = 2) -> dict:
    """One child run plus the computed fp32 anchor; the dict the table (and the test) read."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"--n-layers={n_layers}", f"--vocab={vocab}",
           f"--qtype={qtype}", f"--rank={rank}", f"--seq={seq}", f"--threads={threads}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    n_params = _shape(n_layers, vocab).num_params()
    result |= {"n_layers": n_layers, "vocab": vocab, "qtype": qtype, "params": n_params,
               "fp32_full_ft_bytes": n_params * FULL_FT_BYTES_PER_PARAM}
    result["ratio"] = result["fp32_full_ft_bytes"] / result["peak_rss_bytes"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--qtype", default="Q4_0", choices=sorted(_GGML))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(child(args)))
        return 0
    r = run(args.n_layers, args.vocab, args.qtype, args.rank, args.seq, args.threads)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"Llama-3.2-1B shape, {args.n_layers} layers, vocab {args.vocab}: {r['params'] / 1e9:.3f} B parameters")
    print(f"QLoRA ({args.qtype} base, LoRA rank {args.rank}, {r['trainable_params'] / 1e6:.1f} M trainable), one step "
          f"of {args.seq} tokens: peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB  (build {r['build_s']:.0f} s, "
          f"step {r['step_s']:.1f} s)")
    print(f"full fp32 fine-tuning (weights + grads + Adam, computed): {r['fp32_full_ft_bytes'] / GIB:.1f} GiB")
    print(f"ratio: {r['ratio']:.1f}x less memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
