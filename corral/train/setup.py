"""Step 1-2 of a pretraining run: processes, seeds, data, the model and its parallel transforms."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from corral.data.tokenize import prepare_shards
from corral.errors import ConfigError
from corral.model.llama import Transformer, init_weights_
from corral.train.config import PretrainConfig
from corral.train.loader import TokenLoader
from corral.train.optim import build_optimizer, build_scheduler
from corral.train.pretrain import Run, _seed

# Dense bf16 peak TFLOP/s per device by name fragment (vendor datasheets), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def _device_type(config: PretrainConfig) -> str:
    wanted = config.train.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return wanted


def peak_flops(config: PretrainConfig, device: torch.device) -> float:
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


def flops_per_token(config: PretrainConfig) -> float:
    """6 x matmul parameters (forward + backward) + attention scores (PaLM, arXiv 2204.02311 appendix B)."""
    m = config.model
    matmul_params = m.num_params() - (0 if m.tie_embeddings else m.vocab_size * m.dim)  # the lookup is free
    return 6.0 * matmul_params + 12.0 * m.n_layers * m.dim * config.data.seq_len


def _mesh(config: PretrainConfig, device_type: str):
    p = config.parallel
    if (p.dp, p.tp, p.pp) == (1, 1, 1) and "WORLD_SIZE" not in os.environ:
        return None
    from corral.train.mesh import build_mesh

    return build_mesh(p.dp, p.tp, p.pp, device_type)  # joins torchrun's process group


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


def _parallel_model(model: Transformer, config: PretrainConfig, mesh):
    """Pipeline stage (if pp > 1), then TP -> AC -> compile -> FSDP; returns (module, pipeline, pp_mesh)."""
    from corral.train.mesh import mesh_dim
    from corral.train.parallel import parallelize

    pp_mesh = mesh_dim(mesh, "pp")
    module = model
    if pp_mesh is not None:
        from corral.train.pipeline import build_stage_module

        module = build_stage_module(model, pp_mesh)
    dtype = torch.bfloat16 if config.train.dtype == "bfloat16" and mesh_dim(mesh, "dp") is not None else None
    # One process compiles the whole trunk as one graph in _loss_fn instead of each block here.
    parallelize(module, mesh, ac=config.train.activation_checkpointing,
                compile=config.train.compile and mesh is not None, param_dtype=dtype)
    pipe = None
    if pp_mesh is not None:
        from corral.train.pipeline import build_pipeline

        pipe = build_pipeline(module, pp_mesh, config.parallel.pp_microbatches, config.parallel.pp_schedule)
    return module, pipe, pp_mesh


def _loss_fn(module, config: PretrainConfig, mesh):
    """loss(inputs, targets) for train_step and evaluate (a pipeline computes its loss in its last stage)."""
    from corral.train.loss import build_loss, reference_loss

    if mesh is not None:
        # FSDP gathers the root's parameters (embedding, norm, output) in hooks around the model's own forward;
        # TP and pipeline stages are kept on the path the parallel tests check against one process.
        return lambda inputs, targets: reference_loss(module, inputs, targets)
    return build_loss(module, config.train.loss_chunk_rows, compile=config.train.compile)


def setup(config: PretrainConfig) -> Run:
    """Everything a run needs, on this rank."""
    if not config.data.train:
        raise ConfigError("data.train is empty: name at least one text, JSONL or shard source")
    _check_pipeline(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device_type = _device_type(config)
    mesh = _mesh(config, device_type)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dp_rank, dp_size = 0, 1
    if mesh is not None:
        dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    train_shards = _shards(config, config.data.train, rank)
    val_shards = _shards(config, config.data.val, rank) if config.data.val else []
    loader = TokenLoader(train_shards, config.data.seq_len, config.data.batch_size, rank=dp_rank,
                         world_size=dp_size, seed=config.data.seed)
    val_loader = TokenLoader(val_shards, config.data.seq_len, config.data.batch_size, rank=dp_rank,
                             world_size=dp_size, shuffle=False) if val_shards else None
    _seed(config.train.seed)
    with torch.device(device):
        model = init_weights_(Transformer(config.model))
    n_params = sum(p.numel() for p in model.parameters())
    module, pipe, pp_mesh = _parallel_model(model, config, mesh)
    optimizer = build_optimizer(module, config.optim, fused=mesh is None)
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)
    return Run(config=config, model=module, optimizer=optimizer, scheduler=scheduler, loader=loader,
               val_loader=val_loader, device=device, rank=rank, world=world, dp_size=dp_size, pipe=pipe,
               pp_mesh=pp_mesh, loss_fn=_loss_fn(module, config, mesh), n_params=n_params,
               flops_per_token=flops_per_token(config), peak_flops=peak_flops(config, device))


def resume_path(config: PretrainConfig) -> Path | None:
    """The checkpoint to resume from: none, the newest committed one ("auto"), or a named path."""
    from corral.train.state import latest_checkpoint, resolve_checkpoint

    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(Path(config.out_dir) / "checkpoints")
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"checkpoint.resume: {path} does not exist")
    return resolve_checkpoint(path)
