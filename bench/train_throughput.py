"""Training tokens/s: Corral's train step vs a plain transformers LlamaForCausalLM loop.

    python bench/train_throughput.py --threads 1                       # configs/pretrain/debug.toml shape
    python bench/train_throughput.py --threads 1 --compile --hf-compile   # both sides torch.compile'd
    python bench/train_throughput.py --threads 1 --bytes --compile --hf-compile   # byte vocabulary
    python bench/train_throughput.py --set model.dim=256 --steps 30 --json

Both sides get the same model shape (translated to a LlamaConfig), the same initial weights
(Corral's, copied through the HF key map), the same token batches (the config's corpus
through Corral's loader), AdamW with the same hyperparameters, gradient clipping at 1.0,
fp32, the same torch thread count, in the same process one after the other. Corral runs its
real ``train_step`` (corral.train.loop, with pretraining's objective) on what ``setup`` built: the fused chunked
output-projection + cross-entropy (corral.train.loss), fused AdamW, and with ``--compile``
the whole trunk compiled as one graph. transformers runs the loop a user would write:
``model(input_ids).logits`` -> cross-entropy -> backward -> clip -> step, with
``torch.compile(model)`` under ``--hf-compile`` and torch's default AdamW (``--hf-fused-adamw``
gives it the fused AdamW too). Compare compiled with compiled: ``--compile --hf-compile``.
The two alternate step by step on the same batch (a shared machine's load then hits both
alike). The first ``--warmup`` steps (compilation, allocator warm-up) are not timed; the
figure is the median step time over the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def build_config(args, out_dir: str):
    from corral.train.config import load_config

    overrides = [f"--out_dir={out_dir}", f"--train.steps={args.steps + args.warmup}", "--train.progress=false",
                 "--train.tensorboard=false", f"--train.threads={args.threads}",
                 f"--train.compile={str(args.compile).lower()}"]
    if args.bytes:
        overrides += ["--model.vocab_size=256"]
    overrides += [f"--{item}" for item in args.set]
    return load_config(args.config, overrides)


def byte_shard_config(config, out_dir: Path):
    """Swap the text sources for UTF-8 byte shards (vocabulary 256)."""
    import dataclasses

    from corral.train.scaling_sweep import byte_shards

    data = dataclasses.replace(config.data, train=byte_shards(config.data.train, out_dir / "shards"), val=[])
    return dataclasses.replace(config, data=data)


def hf_step(forward, model, opt, inputs, targets, grad_clip: float) -> None:
    """The loop a transformers user writes: logits -> cross-entropy -> backward -> clip -> step."""
    logits = forward(input_ids=inputs).logits  # (B, T, vocab)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(config, n: int, hf_fused: bool = False, hf_compile: bool = False) -> tuple[list[float], list[float]]:
    """Step times of both sides, alternating step by step on the same batch, so that a busy
    machine's load changes hit both equally."""
    from corral.model.llama import Transformer, init_weights_
    from corral.train.failure import LossGuard
    from corral.train.loop import train_step
    from corral.train.pretrain import next_token_objective
    from corral.train.setup import setup

    run = setup(config)
    guard = LossGuard(config.failure, [])
    loss_fn = next_token_objective(run)
    torch.manual_seed(config.train.seed)
    model = hf_model(config, init_weights_(Transformer(config.model)))  # Corral's initial weights
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=hf_fused or None)
    model.train()
    forward = torch.compile(model) if hf_compile else model
    corral_times, hf_times = [], []
    for _ in range(n):
        batch = run.loader.next_batch()  # (B, T) inputs and targets
        t0 = time.perf_counter()
        train_step(run, [batch], loss_fn, guard)
        t1 = time.perf_counter()
        hf_step(forward, model, opt, *batch, o.grad_clip)
        corral_times.append(t1 - t0)
        hf_times.append(time.perf_counter() - t1)
    return corral_times, hf_times


def hf_model(config, corral_model):
    """A LlamaForCausalLM of the same shape holding Corral's initial weights (sdpa attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from corral.checkpoint.base import permute_qk
    from corral.checkpoint.hf import meta_to_hf_key

    m = config.model
    hf_config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.hidden_dim,
                            num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                            num_key_value_heads=m.kv_heads, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                            max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_embeddings,
                            attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(hf_config)
    state = {}
    for key, tensor in corral_model.state_dict().items():
        if key.endswith("attention.wq.weight"):
            tensor = permute_qk(tensor, m.n_heads)  # Meta's interleaved RoPE pairs -> HF's half split
        elif key.endswith("attention.wk.weight"):
            tensor = permute_qk(tensor, m.kv_heads)
        state[meta_to_hf_key(key)] = tensor.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "pretrain" / "debug.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--bytes", action="store_true", help="byte-level data and vocabulary 256")
    p.add_argument("--compile", action="store_true", help="Corral compiles its trunk (train.compile)")
    p.add_argument("--hf-compile", action="store_true", help="transformers runs torch.compile(model)")
    p.add_argument("--hf-fused-adamw", action="store_true", help="give transformers fused AdamW as well")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config(args, tmp)
        if args.bytes:
            config = byte_shard_config(config, Path(tmp))
        times, hf_times = measure(config, args.steps + args.warmup, args.hf_fused_adamw, args.hf_compile)
    tokens = config.data.batch_size * config.data.seq_len
    corral_tps = tokens / statistics.median(times[args.warmup:])
    hf_tps = tokens / statistics.median(hf_times[args.warmup:])
    report = {"config": args.config, "bytes": args.bytes, "compile": args.compile, "threads": args.threads,
              "hf_compile": args.hf_compile, "hf_fused_adamw": args.hf_fused_adamw,
              "model": {k: getattr(config.model, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                               "vocab_size", "tie_embeddings")},
              "batch": [config.data.batch_size, config.data.seq_len], "steps": args.steps,
              "corral_tokens_per_s": round(corral_tps, 1), "transformers_tokens_per_s": round(hf_tps, 1),
              "ratio": round(corral_tps / hf_tps, 3), "torch": torch.__version__}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
