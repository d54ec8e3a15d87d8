"""Post-training: supervised fine-tuning, reward models and preference optimization on the shared loop.

``corral finetune CONFIG.toml`` (commands.py) -> ``run_finetune`` (finetune.py): the base model, its chat
format and the dataset (data.py, records.py), one objective's loss_fn (sft.py, preference.py, reward.py)
for ``corral.train.loop.train_loop``, then the result written where ``corral run`` and the server load it.
"""
