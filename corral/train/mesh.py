"""The device mesh: how the world's ranks divide into pipeline, data and tensor parallel groups.

A mesh of shape (pp, dp, tp) with dims named "pp", "dp", "tp". The innermost dim (tp) holds
neighbouring ranks because tensor parallelism talks every layer (it wants the fastest links,
NVLink inside a node); pipeline parallelism talks least (one activation per microbatch
per stage boundary), so it is outermost and may cross nodes. Same layout as torchtitan.

Launched by ``torchrun``, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; a single process without those variables gets no mesh at all (None), so the
plain model runs exactly as it would without torch.distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from corral.errors import ConfigError

MESH_DIMS = ("pp", "dp", "tp")

# gloo runs collectives on CPU tensors, nccl on CUDA tensors; those are the two we test.
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def init_distributed(device_type: str) -> bool:
    """Join the process group torchrun describes; return False when this is a lone process.

    For CUDA each rank takes the GPU numbered by LOCAL_RANK, so collectives and the model
    live on the same device.
    """
    if device_type not in BACKENDS:
        raise ConfigError(f"device_type must be one of {sorted(BACKENDS)}, got {device_type!r}")
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=BACKENDS[device_type])
    return True


def build_mesh(dp: int, tp: int, pp: int, device_type: str) -> DeviceMesh | None:
    """A (pp, dp, tp) mesh over all ranks, or None when dp = tp = pp = 1 (plain single process).

    The product must equal the world size; dp may be -1 to mean "whatever is left"
    (world_size / (tp * pp)), as a convenience for torchrun launches of any size.
    """
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
    if not isinstance(dp, int) or (dp < 1 and dp != -1):
        raise ConfigError(f"parallel.dp must be a positive integer or -1, got {dp!r}")
    launched = init_distributed(device_type)
    world = dist.get_world_size() if launched else 1
    if dp == -1:
        if world % (tp * pp):
            raise ConfigError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
        dp = world // (tp * pp)
    if dp * tp * pp != world:
        raise ConfigError(
            f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} must equal the world size {world}"
            + ("" if launched else " (launch with torchrun --nproc_per_node=N for more than one process)")
        )
    if world == 1:
        return None
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)


def mesh_dim(mesh: DeviceMesh | None, name: str) -> DeviceMesh | None:
    """The 1-D sub-mesh for one dim ("pp", "dp" or "tp"), or None when that dim has size 1."""
    if mesh is None or name not in MESH_DIMS:
        return None
    sub = mesh[name]
    return sub if sub.size() > 1 else None
