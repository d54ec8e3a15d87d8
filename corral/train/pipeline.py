"""Pipeline parallelism: the Transformer cut into stages by layers, run with torch.distributed.pipelining.

Stage k of pp holds a contiguous run of blocks; the first also holds the token embedding,
the last the final norm and output projection. A batch is cut into microbatches and the
schedule (GPipe: all forwards then all backwards; 1F1B: one forward, one backward, which
bounds live activations to pp microbatches) moves (mb, T, dim) activations between
neighbouring stages. Gradients are divided by the number of microbatches, so with a loss
that is the mean over a microbatch the result equals one process on the whole batch.

A stage is the Transformer itself, pruned (as torchtitan does): it keeps the whole model's parameter
names (``layers.5.attention.wq.weight``), so checkpoints written by stages merge into the plain model's
state dict, and it runs the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from corral.errors import ConfigError
from corral.model.llama import Transformer

SCHEDULES = ("gpipe", "1f1b")


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible layer ranges; earlier stages take the remainder."""
    if n_stages > n_layers:
        raise ConfigError(f"parallel.pp={n_stages} stages need at least as many layers, got n_layers={n_layers}")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for k in range(n_stages):
        stop = start + base + (1 if k < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def prune_to_stage_(model: Transformer, layer_ids: range, first: bool, last: bool) -> Transformer:
    """Keep blocks ``layer_ids`` of ``model``, the embedding if first and norm/output if last; in place.

    The stage is the same Transformer with the rest removed (Transformer.hidden skips what is None), and
    its blocks sit in a ModuleDict keyed by their index, so names stay ``layers.{i}.*``.
    """
    if last and model.output is None:
        raise ConfigError("pipeline parallelism needs an untied output projection (tie_embeddings=false)")
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm, model.output = None, None
    return model


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions: logits (B, T, vocab), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass
class Pipeline:
    module: Transformer
    """This rank's stage (a pruned Transformer); optimize it, transform it (TP/AC/compile/FSDP) like a model."""
    schedule: object
    """A torch.distributed.pipelining schedule over one stage per rank."""
    pp_mesh: DeviceMesh
    is_first: bool
    is_last: bool


def build_stage_module(model: Transformer, pp_mesh: DeviceMesh) -> Transformer:
    """Prune `model` to this rank's stage (call before TP/AC/compile/FSDP, which then apply to the stage)."""
    n_stages, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    ranges = split_layers(model.config.n_layers, n_stages)
    return prune_to_stage_(model, ranges[rank], first=rank == 0, last=rank == n_stages - 1)


def build_pipeline(
    stage_module: Transformer,
    pp_mesh: DeviceMesh,
    n_microbatches: int,
    schedule: str = "1f1b",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss,
) -> Pipeline:
    """Wrap an (already transformed) stage module in a PipelineStage and a schedule."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {SCHEDULES}, got {schedule!r}")
    n_stages, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    if n_microbatches < n_stages:
        raise ConfigError(f"parallel.pp_microbatches={n_microbatches} must be at least pp={n_stages}")
    device_type = pp_mesh.device_type
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    stage = PipelineStage(stage_module, rank, n_stages, device, group=pp_mesh.get_group())
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)
    return Pipeline(stage_module, sched, pp_mesh, is_first=rank == 0, is_last=rank == n_stages - 1)


def pipeline_step(pipe: Pipeline, tokens: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
    """One forward (and backward if train) of the batch through all stages; the mean loss on every rank.

    tokens, targets: (B, T) with B divisible by the number of microbatches; every stage passes
    them (only the first stage reads tokens and only the last reads targets).
    """
    losses: list[torch.Tensor] = []
    run = pipe.schedule.step if train else pipe.schedule.eval
    args = (tokens,) if pipe.is_first else ()
    kwargs = {"target": targets, "losses": losses} if pipe.is_last else {}
    if train:
        kwargs["return_outputs"] = False
    run(*args, **kwargs)
    if pipe.is_last:
        loss = torch.stack([x.detach() for x in losses]).mean().float()
    else:
        loss = torch.zeros((), dtype=torch.float32, device=tokens.device)
    # The loss exists only on the last stage; every rank logs it and checks it for NaN.
    group = pipe.pp_mesh.get_group()
    dist.broadcast(loss, src=dist.get_global_rank(group, pipe.pp_mesh.size() - 1), group=group)
    return loss
