"""Fine-tuning throughput: `corral finetune` against TRL's SFTTrainer (tokens/s) and DPOTrainer (steps/s).

    python bench/posttrain.py                          # debug-shaped model (dim 128, 4 layers, Llama 3 vocab)
    python bench/posttrain.py --dim 64 --layers 2 --steps 4 --warmup 1 --json   # the smoke size of the tests

Both sides get the same model (random weights written once as an HF directory with Meta's Llama 3
tokenizer and its Jinja chat template, which transformers and Corral both load), the same rows
(data/sft/identity.json for SFT, the HH harmless pairs for DPO), the same batch size, maximum length,
fp32 (TRL's bf16 default and gradient checkpointing turned off), AdamW with the same learning rate,
the same torch thread count, one after the other in this process. Corral runs `run_finetune`, the
shared loop; TRL its trainer's `train()`. Loss only on completions on both sides (TRL's
prompt-completion rows, Corral's assistant-token labels); DPO's reference log-probs precomputed on both.
The first ``--warmup`` steps are not timed; the figure is the median of the rest, from Corral's
metrics.jsonl (``step_s``, ``tokens``) and a TRL callback around each optimizer step. The machine's
load is whatever it is: run both sides back to back and read the ratio, not the absolute figures.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{% endif %}")


def write_model(directory: Path, dim: int, layers: int) -> Path:
    """Random debug-shaped weights as an HF directory with the Llama 3 tokenizer and chat template."""
    import dataclasses

    from corral.checkpoint.export import export_with_llama3_tokenizer
    from corral.model.config import PRESETS
    from corral.train.setup import fresh_model

    config = dataclasses.replace(PRESETS["debug"], dim=dim, n_layers=layers, n_heads=4, n_kv_heads=1,
                                 multiple_of=64, tie_embeddings=True, max_seq_len=512)
    model = fresh_model(config, torch.device("cpu"), 0)
    export_with_llama3_tokenizer(config, model.state_dict(), directory, "hf")
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok_config.update(chat_template=LLAMA3_TEMPLATE, pad_token="<|end_of_text|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return directory


def sft_rows(n: int) -> list[dict]:
    rows = json.loads((REPO / "data" / "sft" / "identity.json").read_text())[:n]
    return [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "completion": [{"role": "assistant", "content": r["output"].replace("{{name}}", "Corral")
                             .replace("{{author}}", "the Corral authors")}]} for r in rows]


def dpo_rows(n: int) -> list[dict]:
    from corral.posttrain.records import read_records

    records = read_records([str(REPO / "data" / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz")],
                           skip_bad=True)[:n]
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]


def corral_side(kind: str, model_dir: Path, data: Path, out: Path, args) -> dict:
    from corral.posttrain.config import load_finetune_config
    from corral.posttrain.finetune import run_finetune
    from corral.train.loop import read_metrics

    overrides = [f"--objective={json.dumps(kind)}", f"--out_dir={json.dumps(str(out))}",
                 f"--model.source={json.dumps(str(model_dir))}", f"--data.train=[{json.dumps(str(data))}]",
                 f"--data.max_len={args.max_len}", f"--data.batch_size={args.batch}", "--data.skip_bad_rows=true",
                 f"--train.steps={args.steps + args.warmup}", f"--train.threads={args.threads}",
                 "--train.progress=false", "--train.tensorboard=false", "--checkpoint.every=0",
                 "--optim.lr=1e-5", "--optim.warmup_steps=0", "--optim.weight_decay=0.0", "--optim.grad_clip=1.0"]
    result = run_finetune(load_finetune_config(None, overrides))
    records = [r for _, r in sorted(read_metrics(result.metrics_path).items())]
    seen = [0] + [r["tokens_seen"] for r in records]
    tokens = [b - a for a, b in zip(seen, seen[1:])][args.warmup:]  # non-padding tokens of each step
    step_s = [r["step_s"] for r in records][args.warmup:]
    return {"step_s": statistics.median(step_s), "tokens_per_s": sum(tokens) / sum(step_s)}


def trl_side(kind: str, model_dir: Path, rows: list[dict], out: Path, args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            self.times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(out), max_steps=args.steps + args.warmup, per_device_train_batch_size=args.batch,
                  learning_rate=1e-5, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False,
                  gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  dataloader_num_workers=0, max_length=args.max_len, disable_tqdm=True, seed=0)
    clock = Clock()
    if kind == "sft":
        config = trl.SFTConfig(**common, packing=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[clock])
    else:
        config = trl.DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    per_step = [b - a for a, b in zip([0.0] + tokens, tokens)][args.warmup:]
    times = clock.times[args.warmup:]
    return {"step_s": statistics.median(times), "tokens_per_s": sum(per_step) / sum(times) if per_step else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["sft", "dpo"], default=None)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"threads": args.threads, "model": {"dim": args.dim, "layers": args.layers, "vocab": 128256},
                    "batch": args.batch, "max_len": args.max_len, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="corral-bench-posttrain-") as tmp:
        tmp = Path(tmp)
        model_dir = write_model(tmp / "model", args.dim, args.layers)
        n = (args.steps + args.warmup) * args.batch
        for kind, rows in (("sft", sft_rows(n)), ("dpo", dpo_rows(n))):
            if args.only not in (None, kind):
                continue
            data = tmp / f"{kind}.jsonl"
            data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            ours = corral_side(kind, model_dir, data, tmp / f"corral-{kind}", args)
            theirs = trl_side(kind, model_dir, rows, tmp / f"trl-{kind}", args)
            key = "tokens_per_s" if kind == "sft" else "step_s"
            ratio = ours[key] / theirs[key] if kind == "sft" else theirs[key] / ours[key]
            report[kind] = {"corral": ours, "trl": theirs, "ratio": ratio,
                            "measure": "tokens/s" if kind == "sft" else "steps/s"}
    if args.json:
        print(json.dumps(report))
    else:
        for kind in ("sft", "dpo"):
            if kind in report:
                r = report[kind]
                print(f"{kind}: corral {r['corral']}  trl {r['trl']}  ratio ({r['measure']}) {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
