"""Llama 3's data-mix experiment in miniature: curate, mix two ways, pretrain a tiny model on each mix for
the same number of steps, and compare validation loss per source (docs/curation.md has the table).

    python scripts/curation_mix_experiment.py --steps 80 --out runs/mix-experiment

Sources: web = data/web/c4_demo.jsonl through configs/curate/web.toml's pipeline; books = the four
Gutenberg books of data/corpus, cut into ~2,000-character documents. Each source holds out 10% of its
documents (the same ones in both mixes) as val/<source>.bin. Mix A weighs them 1 : 1, mix B 3 : 0.25.
Both runs use one model shape, seed, learning rate and step count; the loss is the mean next-token loss
over the first 100 full 64-token windows of each validation shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIXES = {"A (web 1, books 1)": {"web": 1.0, "books": 1.0}, "B (web 3, books 0.25)": {"web": 3.0, "books": 0.25}}
SEQ = 64


def curate_web(out: Path) -> Path:
    from corral.data.executor import curate, run_local
    from corral.data.pipeline import load_config

    config = load_config(ROOT / "configs/curate/web.toml",
                         [f'--input.paths=["{ROOT / "data/web/c4_demo.jsonl"}"]', f"--output.dir={out}"])
    curate(config, run_local(1))
    return out / "shards"


def write(out: Path, weights: dict[str, float], web: Path) -> None:
    from corral.data.mix import MixConfig, MixSource, write_mix

    write_mix(MixConfig(out_dir=str(out), val_fraction=0.1, sources=[
        MixSource("web", [str(web)], weights["web"]),
        MixSource("books", [str(ROOT / "data/corpus/gutenberg")], weights["books"], chunk_chars=2000)]))


def pretrain(mix: Path, out: Path, steps: int) -> Path:
    from corral.train.config import load_config
    from corral.train.pretrain import run_pretrain

    overrides = {"out_dir": str(out), "model.preset": "debug", "model.dim": 64, "model.n_layers": 2,
                 "model.n_heads": 4, "model.n_kv_heads": 1, "model.multiple_of": 32, "model.max_seq_len": SEQ,
                 "model.tie_embeddings": True, "data.train": [str(mix / "train")], "data.seq_len": SEQ,
                 "data.batch_size": 4, "train.steps": steps, "train.progress": False, "train.tensorboard": False,
                 "train.val_every": 0, "optim.lr": 3e-3, "optim.warmup_steps": 10, "checkpoint.every": steps}
    return run_pretrain(load_config(None, [f"--{k}={json.dumps(v)}" for k, v in overrides.items()])).checkpoint


def val_loss(checkpoint: Path, shard: Path, max_windows: int = 100) -> float:
    """Mean next-token cross-entropy over full SEQ-token windows of the shard (nats per token)."""
    import torch
    import torch.nn.functional as F

    from corral.data.shards import read_shard
    from corral.model.llama import Transformer
    from corral.train.state import load_model_weights

    config, weights = load_model_weights(checkpoint)
    model = Transformer(config)
    model.load_state_dict(weights)
    model.eval()
    ids = torch.from_numpy(read_shard(shard).astype("int64"))
    n = min((len(ids) - 1) // SEQ, max_windows)
    inputs = ids[: n * SEQ].view(n, SEQ)  # (n, SEQ)
    targets = ids[1: n * SEQ + 1].view(n, SEQ)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[None])[0], y) for x, y in zip(inputs, targets)]
    return float(torch.stack(losses).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default="runs/mix-experiment")
    args = p.parse_args()
    out = Path(args.out)
    web = curate_web(out / "curated-web")
    table = {}
    for i, (name, weights) in enumerate(MIXES.items()):
        mix = out / f"mix-{i}"
        write(mix, weights, web)
        checkpoint = pretrain(mix, out / f"run-{i}", args.steps)
        manifest = json.loads((mix / "manifest.json").read_text())
        table[name] = {source: {"val_loss": round(val_loss(checkpoint, out / "mix-0" / "val" / f"{source}.bin"), 4),
                                "train_tokens": manifest["sources"][source]["train_tokens"]}
                       for source in ("web", "books")}
    print(f"| mix | web train tokens | books train tokens | web val loss | books val loss |  ({args.steps} steps)")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in table.items():
        print(f"| {name} | {row['web']['train_tokens']:,} | {row['books']['train_tokens']:,} | "
              f"{row['web']['val_loss']:.3f} | {row['books']['val_loss']:.3f} |")
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
