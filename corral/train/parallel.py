"""Parallelism as transforms on a finished model: apply_tp -> apply_ac -> apply_compile -> apply_fsdp.

The model (corral/model/llama.py) knows nothing of process groups; each function here
rewrites it in place, and the order matters (the same order as torchtitan):

1. Tensor parallel first: it replaces weights by DTensors sharded over the "tp" mesh and
   must see plain nn.Linear modules (not checkpoint or compile wrappers).
2. Activation checkpointing next: it wraps each block's forward, so the recomputation in
   backward replays the TP collectives the block already contains.
3. Compile each block after that, so the compiled graph includes the checkpoint region
   (recomputation is traced and fused too) and the TP DTensor ops.
4. FSDP last: fully_shard shards whatever parameters exist by then (plain or TP DTensors,
   giving 2-D "dp x tp" parameters) and its per-block all-gather/reduce-scatter hooks wrap
   the already compiled blocks, so communication overlaps with the compiled compute.

Pipeline parallelism (corral/train/pipeline.py) cuts the model into stages before any of
these; each stage is then transformed like a whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from corral.errors import ConfigError

AC_MODES = ("none", "full", "selective")


def blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The transformer blocks of a whole model or of a pipeline stage (Transformer.blocks)."""
    return iter(model.blocks())


# --- tensor parallel -----------------------------------------------------------------------


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Megatron-style TP (Shoeybi et al. 2019, arXiv 1909.08053) on every block, in place.

    wq/wk/wv and w1/w3 are split by output column, so each rank computes a slice of the
    heads / of the SwiGLU hidden units with no communication; wo and w2 are split by input
    row and their partial outputs are summed by one all-reduce. Two all-reduces per block
    forward, two in backward. Embeddings, norms and the output projection stay replicated
    (they are small next to the blocks at the sizes we run; their gradients are identical
    on every TP rank because their inputs are).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    plan = {
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in blocks(model):
        attn = block.attention
        hidden = block.feed_forward.w1.out_features
        if attn.n_heads % tp or attn.n_kv_heads % tp or hidden % tp:
            raise ConfigError(
                f"parallel.tp={tp} must divide n_heads={attn.n_heads}, n_kv_heads={attn.n_kv_heads} "
                f"and the feed-forward width {hidden}"
            )
        parallelize_module(block, tp_mesh, plan)
        # Attention reshapes its projections with these counts: (B, T, n_heads, head_dim). After
        # the column split each rank holds n_heads / tp query heads and n_kv_heads / tp kv heads;
        # the GQA ratio is unchanged because both divide by tp.
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
    return model


# --- activation checkpointing --------------------------------------------------------------


def _save_list() -> list:
    """Ops whose outputs selective AC keeps: matmuls, attention and collectives (expensive to redo).

    Everything else (norms, SiLU, RoPE, adds) is cheap and recomputed in backward.
    """
    aten = torch.ops.aten
    names = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default]
    ops += [getattr(aten, n).default for n in names if hasattr(aten, n)]
    funcol = getattr(torch.ops, "_c10d_functional", None)
    if funcol is not None:
        ops += [funcol.all_reduce.default, funcol.reduce_scatter_tensor.default]
    return ops


def _selective_context():
    saved = set(_save_list())

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpoint_forward(block: nn.Module, mode: str) -> None:
    """Replace block.forward (on the instance, so parameter names do not change) by a checkpointed call."""
    inner = block.forward
    extra = {"context_fn": _selective_context} if mode == "selective" else {}

    def forward(*args, **kwargs):
        # Non-reentrant checkpointing: works with keyword args, DTensors, FSDP2 hooks and torch.compile.
        return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = forward


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Activation checkpointing per block, in place.

    "full" keeps only each block's input and recomputes the whole block in backward (memory
    ~ one activation per layer, about 1/3 more compute). "selective" keeps the outputs of
    matmuls, attention and collectives and recomputes the cheap elementwise ops (Korthikanti
    et al. 2022, arXiv 2205.05198): most of the memory saving for a few percent of compute.
    """
    if mode not in AC_MODES:
        raise ConfigError(f"activation checkpointing mode must be one of {AC_MODES}, got {mode!r}")
    if mode != "none":
        for block in blocks(model):
            _checkpoint_forward(block, mode)
    return model


# --- compile and FSDP ----------------------------------------------------------------------


def apply_compile(model: nn.Module, backend: str = "inductor", fullgraph: bool = True) -> nn.Module:
    """torch.compile each block in place (nn.Module.compile keeps parameter names).

    Per block rather than the whole model: every block has the same code, so dynamo compiles
    one graph and reuses it for all layers (compile time independent of depth), and FSDP can
    still gather each block's weights just before that block runs.
    """
    for block in blocks(model):
        block.compile(backend=backend, fullgraph=fullgraph)
    return model


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2 (per-parameter sharding, torch.distributed.fsdp.fully_shard) per block, then the root.

    Each rank keeps 1/dp of every parameter, gradient and optimizer state (ZeRO-3). A block's
    parameters are all-gathered just before its forward and again for its backward, and its
    gradients are reduce-scattered (averaged over dp) right after. param_dtype is the
    compute dtype of the gathered weights (bf16 halves traffic); reduce_dtype that of the
    gradient reduction (keep fp32 for accuracy). The master weights stay in their own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layer_list = list(blocks(model))
    for i, block in enumerate(layer_list):
        # The last block's backward starts as soon as its forward ends (the root's norm/output
        # come in between); keeping it unsharded saves one all-gather.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layer_list) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    ac: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """All transforms in the documented order, for whichever mesh dims are larger than 1."""
    from corral.train.mesh import mesh_dim

    tp_mesh, dp_mesh = mesh_dim(mesh, "tp"), mesh_dim(mesh, "dp")
    if tp_mesh is not None:
        apply_tp(model, tp_mesh)
    apply_ac(model, ac)
    if compile:
        apply_compile(model)
    if dp_mesh is not None:
        apply_fsdp(model, dp_mesh, param_dtype, reduce_dtype)
    return model


# --- gradient norm across every kind of shard ----------------------------------------------


def _shard_groups(grad: torch.Tensor) -> tuple:
    """The process groups a gradient's squared sum must be summed over: its sharded mesh dims."""
    if not isinstance(grad, DTensor):
        return ()
    mesh = grad.device_mesh
    # Anything but Replicate holds a part of the sum: Shard, Partial and FSDP's _StridedShard (a 2-D
    # dp x tp parameter sharded twice along one dim, for which is_shard() is False).
    return tuple(mesh.get_group(i) for i, p in enumerate(grad.placements) if not p.is_replicate())


def clip_grad_norm_(
    parameters: Iterable[nn.Parameter], max_norm: float, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Clip the global gradient norm in place; return the norm before clipping (a plain tensor).

    Works for any mix of plain gradients (replicated), TP/FSDP DTensor gradients (a slice
    each) and pipeline stages (each holding other parameters): local squared sums are summed
    over each gradient's shard groups, then over the pipeline group. Every rank gets the
    same norm, so every rank clips by the same factor, as one process would.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    by_groups: dict[tuple, torch.Tensor] = {}
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        key = _shard_groups(g)
        # vector_norm reads the gradient once and allocates no squared copy (the embedding's is 65 MB at 128K x 128).
        by_groups[key] = by_groups.get(key, 0) + torch.linalg.vector_norm(local.detach(), dtype=torch.float32) ** 2
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), device=device)
    for groups, sq in by_groups.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = total + sq
    if pp_mesh is not None:
        dist.all_reduce(total, group=pp_mesh.get_group())
    norm = total.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if plain:
        torch._foreach_mul_(plain, scale.to(plain[0].dtype))  # one call for all; no host sync
    if sharded:
        factor = scale.item()  # a DTensor multiplies by a Python number, not a plain tensor
        for g in sharded:
            g.mul_(factor)
    return norm
