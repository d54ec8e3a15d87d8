"""Setting a run up, in named phases any objective composes (``setup`` is pretraining's composition):

 1. ``start_processes``: threads, device, the process group and device mesh under torchrun (or a lone process);
 2. the model: ``fresh_model`` (seeded init), ``model_from_file`` (any checkpoint corral.load reads) or
    ``model_from_store`` (a name in the local model store), each a plain float32 Transformer on the device;
 3. ``parallelize_model``: pipeline stage (pp > 1), then TP -> AC -> compile -> FSDP (corral.train.parallel);
 4. ``build_optim``: AdamW and its warmup + cosine schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from corral.data.tokenize import prepare_shards
from corral.errors import ConfigError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_
from corral.train.config import PretrainConfig
from corral.train.loader import TokenLoader
from corral.train.optim import build_optimizer, build_scheduler
from corral.train.run import Run, seed_everything

# Dense bf16 peak TFLOP/s per device by name fragment (vendor datasheets), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass
class Processes:
    """Where this process sits: its device, its ranks and the device mesh (None for one process)."""

    device: torch.device
    mesh: Any = None
    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_size: int = 1


# --- 1. processes ---------------------------------------------------------------------------


def _device_type(config: Any) -> str:
    wanted = config.train.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return wanted


def start_processes(config: Any) -> Processes:
    """Set torch's threads, pick the device and join torchrun's process group when there is one."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device_type = _device_type(config)
    p = config.parallel
    mesh = None
    if (p.dp, p.tp, p.pp) != (1, 1, 1) or "WORLD_SIZE" in os.environ:
        from corral.train.mesh import build_mesh

        mesh = build_mesh(p.dp, p.tp, p.pp, device_type)  # joins torchrun's process group
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    procs = Processes(device=device, mesh=mesh)
    if dist.is_initialized():
        procs.rank, procs.world = dist.get_rank(), dist.get_world_size()
    if mesh is not None:
        procs.dp_rank, procs.dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    return procs


# --- 2. the model ---------------------------------------------------------------------------


def fresh_model(config: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """A new model with seeded normal(0, 0.02) weights (every generator is seeded first)."""
    seed_everything(seed)
    with torch.device(device):
        return init_weights_(Transformer(config))


def model_from_file(path: str | Path, device: torch.device) -> Transformer:
    """Weights of a Meta, HF or GGUF checkpoint (content decides the format) as a float32 Transformer."""
    from corral.checkpoint.load import load_checkpoint

    ckpt = load_checkpoint(path, dtype=torch.float32)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    model.load_state_dict({k: v.to(device) for k, v in ckpt.state_dict.items()}, assign=True)
    return model


def model_from_store(name: str, device: torch.device) -> Transformer:
    """A model of the local store (``corral pull`` / ``corral create`` names) as a float32 Transformer."""
    from corral.store.store import Store

    return model_from_file(Store().model_path(name), device)


# --- 3. parallel transforms -----------------------------------------------------------------


def parallelize_model(model: Transformer, config: Any, mesh) -> tuple[Transformer, Any, Any]:
    """Pipeline stage (if pp > 1), then TP -> AC -> compile -> FSDP; returns (module, pipeline, pp_mesh)."""
    from corral.train.mesh import mesh_dim
    from corral.train.parallel import parallelize

    pp_mesh = mesh_dim(mesh, "pp")
    module = model
    if pp_mesh is not None:
        from corral.train.pipeline import build_stage_module

        module = build_stage_module(model, pp_mesh)
    dtype = torch.bfloat16 if config.train.dtype == "bfloat16" and mesh_dim(mesh, "dp") is not None else None
    # One process compiles the whole trunk as one graph in the loss instead of each block here.
    parallelize(module, mesh, ac=config.train.activation_checkpointing,
                compile=config.train.compile and mesh is not None, param_dtype=dtype)
    pipe = None
    if pp_mesh is not None:
        from corral.train.pipeline import build_pipeline

        pipe = build_pipeline(module, pp_mesh, config.parallel.pp_microbatches, config.parallel.pp_schedule)
    return module, pipe, pp_mesh


# --- 4. optimizer ---------------------------------------------------------------------------


def build_optim(module: torch.nn.Module, config: Any, mesh) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (fused on one process) and its learning-rate schedule over train.steps."""
    optimizer = build_optimizer(module, config.optim, fused=mesh is None)
    return optimizer, build_scheduler(optimizer, config.optim, config.train.steps)


def peak_flops(config: Any, device: torch.device) -> float:
    """One device's peak FLOP/s: the config's value, a GPU table, or a rough CPU estimate."""
    if config.train.peak_tflops > 0:
        return config.train.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12
        return 100e12
    # AVX2 FMA: 2 x 8 fp32 lanes x 2 FLOP per cycle per core, at an assumed 2.5 GHz.
    return torch.get_num_threads() * 32 * 2.5e9


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward) + attention scores (PaLM, arXiv 2204.02311 appendix B)."""
    matmul_params = model.num_params() - (0 if model.tie_embeddings else model.vocab_size * model.dim)  # lookup free
    return 6.0 * matmul_params + 12.0 * model.n_layers * model.dim * seq_len


# --- pretraining's composition --------------------------------------------------------------


def _shards(config: PretrainConfig, sources: list[str], rank: int) -> list[Path]:
    """Rank 0 tokenizes text sources into the shard cache first; the other ranks then find them there."""
    shard_dir = Path(config.data.shard_dir or Path(config.out_dir) / "shards")
    if rank == 0:
        shards = prepare_shards(sources, shard_dir)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        shards = prepare_shards(sources, shard_dir)
    return shards


def _check_pipeline(config: PretrainConfig) -> None:
    if config.parallel.pp > 1:
        if config.optim.grad_accum != 1:
            raise ConfigError("optim.grad_accum must be 1 with parallel.pp > 1 (use parallel.pp_microbatches)")
        if config.data.batch_size % config.parallel.pp_microbatches:
            raise ConfigError(f"data.batch_size={config.data.batch_size} must be divisible by "
                              f"parallel.pp_microbatches={config.parallel.pp_microbatches}")


def pretrain_loss(module, config: PretrainConfig, mesh):
    """loss(inputs, targets) for training and evaluation (a pipeline computes its loss in its last stage)."""
    from corral.train.loss import build_loss, reference_loss

    if mesh is not None:
        # FSDP gathers the root's parameters (embedding, norm, output) in hooks around the model's own forward;
        # TP and pipeline stages are kept on the path the parallel tests check against one process.
        return lambda inputs, targets: reference_loss(module, inputs, targets)
    return build_loss(module, config.train.loss_chunk_rows, compile=config.train.compile)


def setup(config: PretrainConfig) -> Run:
    """Everything a pretraining run needs, on this rank: the phases above plus the token loaders."""
    if not config.data.train:
        raise ConfigError("data.train is empty: name at least one text, JSONL or shard source")
    _check_pipeline(config)
    procs = start_processes(config)
    train_shards = _shards(config, config.data.train, procs.rank)
    val_shards = _shards(config, config.data.val, procs.rank) if config.data.val else []
    loader = TokenLoader(train_shards, config.data.seq_len, config.data.batch_size, rank=procs.dp_rank,
                         world_size=procs.dp_size, seed=config.data.seed)
    val_loader = TokenLoader(val_shards, config.data.seq_len, config.data.batch_size, rank=procs.dp_rank,
                             world_size=procs.dp_size, shuffle=False) if val_shards else None
    model = fresh_model(config.model, procs.device, config.train.seed)
    n_params = sum(p.numel() for p in model.parameters())
    module, pipe, pp_mesh = parallelize_model(model, config, procs.mesh)
    optimizer, scheduler = build_optim(module, config, procs.mesh)
    return Run(config=config, model=module, optimizer=optimizer, scheduler=scheduler, loader=loader,
               val_loader=val_loader, device=procs.device, rank=procs.rank, world=procs.world,
               dp_size=procs.dp_size, pipe=pipe, pp_mesh=pp_mesh, loss_fn=pretrain_loss(module, config, procs.mesh),
               n_params=n_params, flops_per_token=flops_per_token(config.model, config.data.seq_len),
               peak_flops=peak_flops(config, procs.device))
