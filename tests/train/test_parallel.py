"""FSDP2, tensor parallel and pipeline parallel training match one process, step for step.

Each parallel test launches this file under torchrun with 2 gloo processes (real process
groups, real collectives); the worker (`__main__` below) trains 20 AdamW steps with gradient
clipping and writes its per-step losses; the test compares them with the same loop run in
one plain process. fp32 on CPU: the only differences are reduction order, so 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.errors import ConfigError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_
from corral.train.parallel import apply_ac, apply_compile, blocks, clip_grad_norm_

CONFIG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)
STEPS, BATCH, SEQ = 20, 8, 32
REL_TOL = 1e-4


def make_model() -> Transformer:
    torch.manual_seed(0)
    return init_weights_(Transformer(CONFIG))


def make_batches(steps: int = STEPS) -> torch.Tensor:
    """(steps, BATCH, SEQ + 1) token ids; a noisy +1 sequence so there is something to learn."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, CONFIG.vocab_size, (steps, BATCH, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % CONFIG.vocab_size
    noise = torch.randint(0, CONFIG.vocab_size, seq.shape, generator=g)
    return torch.where(torch.rand(seq.shape, generator=g) < 0.2, noise, seq)


def train(params, batches, loss_of, pp_mesh=None) -> list[float]:
    """The loop every variant shares: loss_of(inputs, targets) runs forward+backward and returns the loss."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, foreach=False)
    losses = []
    for tokens in batches:
        loss = loss_of(tokens[:, :-1], tokens[:, 1:])
        clip_grad_norm_(params, 1.0, pp_mesh)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def plain_loss_of(model):
    def loss_of(inputs, targets):
        logits = model(inputs)  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach()

    return loss_of


def reference_losses(steps: int = STEPS) -> list[float]:
    model = make_model()
    return train(model.parameters(), make_batches(steps), plain_loss_of(model))


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst < REL_TOL, f"max relative difference {worst:.2e}\n got {got}\nwant {want}"
    assert want[-1] < want[0] - 0.5, "the reference did not learn; the comparison would be vacuous"


def launch(modes: list[str], out: Path, nproc: int = 2) -> dict[str, list[float]]:
    """One torchrun launch runs every mode in turn (starting torchrun costs more than the training)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, ",".join(modes), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two intra-op threads on two shared, busy cores are several times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(one_thread) -> list[float]:
    return reference_losses()


@pytest.fixture(scope="module")
def parallel_losses(tmp_path_factory) -> dict[str, list[float]]:
    return launch(["fsdp", "tp", "pp"], tmp_path_factory.mktemp("parallel") / "losses.json")


def test_fsdp_two_processes_match_one_process(parallel_losses, reference):
    assert_close(parallel_losses["fsdp"], reference)


def test_tp_two_processes_match_one_process(parallel_losses, reference):
    assert_close(parallel_losses["tp"], reference)


def test_pp_two_stages_match_one_process(parallel_losses, reference):
    assert_close(parallel_losses["pp"], reference)


@pytest.mark.slow
def test_fsdp_times_tp_four_processes_match_one_process(tmp_path, reference):
    """A 2-D mesh (dp 2 x tp 2): TP DTensors sharded again by FSDP2."""
    assert_close(launch(["fsdp_tp"], tmp_path / "losses.json", nproc=4)["fsdp_tp"], reference)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_losses_unchanged(mode):
    model = apply_ac(make_model(), mode)
    losses = train(model.parameters(), make_batches(5), plain_loss_of(model))
    assert losses == pytest.approx(reference_losses(5), rel=1e-5)


def test_activation_checkpointing_keeps_parameter_names():
    names = [n for n, _ in make_model().named_parameters()]
    assert [n for n, _ in apply_ac(make_model(), "full").named_parameters()] == names


def test_ac_mode_unknown_raises_config_error():
    with pytest.raises(ConfigError, match="activation checkpointing mode"):
        apply_ac(make_model(), "some")


@pytest.mark.slow
def test_compiled_blocks_keep_losses_and_names():
    names = [n for n, _ in make_model().named_parameters()]
    model = apply_compile(apply_ac(make_model(), "selective"), backend="aot_eager")
    assert [n for n, _ in model.named_parameters()] == names
    losses = train(model.parameters(), make_batches(3), plain_loss_of(model))
    assert losses == pytest.approx(reference_losses(3), rel=1e-5)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(model))


# --- the worker: run by torchrun, one copy per rank ----------------------------------------


def _worker(mode: str) -> list[float]:
    import torch.distributed as dist

    from corral.train.mesh import build_mesh, mesh_dim
    from corral.train.parallel import apply_fsdp, apply_tp
    from corral.train.pipeline import build_pipeline, build_stage_module, pipeline_step

    world = int(os.environ["WORLD_SIZE"])
    dp, tp, pp = {"fsdp": (world, 1, 1), "tp": (1, world, 1), "pp": (1, 1, world), "fsdp_tp": (-1, 2, 1)}[mode]
    mesh = build_mesh(dp, tp, pp, "cpu")
    model, batches = make_model(), make_batches()
    if mode.startswith("fsdp"):
        # Each dp rank trains on its slice of the same global batch; FSDP averages gradients over dp.
        if mode == "fsdp_tp":
            apply_tp(model, mesh_dim(mesh, "tp"))
        apply_fsdp(model, mesh_dim(mesh, "dp"))
        dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
        shard = BATCH // dp_size
        local = batches[:, dp_rank * shard:(dp_rank + 1) * shard]
        plain = plain_loss_of(model)

        def loss_of(inputs, targets):
            loss = plain(inputs, targets)
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the global-batch loss (tp ranks hold equal copies)
            return loss

        losses = train(model.parameters(), local, loss_of)
    elif mode == "tp":
        apply_tp(model, mesh_dim(mesh, "tp"))
        losses = train(model.parameters(), batches, plain_loss_of(model))
    else:
        pp_mesh = mesh_dim(mesh, "pp")
        pipe = build_pipeline(build_stage_module(model, pp_mesh), pp_mesh, n_microbatches=4, schedule="1f1b")
        losses = train(pipe.module.parameters(), batches, lambda x, y: pipeline_step(pipe, x, y), pp_mesh)
    return losses


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = {mode: _worker(mode) for mode in sys.argv[1].split(",")}
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results))
    dist.destroy_process_group()
