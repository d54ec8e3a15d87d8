"""Checkpoints that survive kill -9, full disks and bit rot (RELIABILITY.md items 29-33).

One checkpoint is a directory ``<root>/step_00000100/``:

    .metadata, __<rank>_0.distcp   model and optimizer through torch.distributed.checkpoint (reshardable)
    rank<r>.pt                     per-rank RNG states (torch, CUDA, Python, NumPy) and the scheduler
    meta.json                      step, model shape, world size, loader position, run counters
    COMMIT                         written last, atomically: {"step", "files": {name: sha256}}

A directory without COMMIT is an interrupted save and is never loaded; it is removed once a later
checkpoint commits. Older committed checkpoints are pruned only after the new one commits, so the
last good checkpoint survives any failure of the save in progress. On load every file's sha256 is
checked against COMMIT, so a corrupted file is a FormatError naming it, never a silent restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig

COMMIT = "COMMIT"
META = "meta.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_committed(path: str | Path) -> bool:
    return (Path(path) / COMMIT).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, committed) for every step directory under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [(step, p, is_committed(p)) for step, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest committed checkpoint under root; interrupted saves (no COMMIT) are ignored."""
    committed = [p for _, p, ok in list_checkpoints(root) if ok]
    return committed[-1] if committed else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must reach the disk before we call the checkpoint good
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


@contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a supported, intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_tensors(state: dict[str, Any], path: Path) -> None:
    """The bulk write (a seam for tests that simulate a full disk)."""
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True))


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loader: Any, extra: dict[str, Any], *, keep: int = 2,
                    before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write and commit the checkpoint of ``step``, then prune to the newest ``keep`` committed ones.

    On any error (OSError ENOSPC included) the partial directory is removed and the error re-raised;
    committed checkpoints are untouched.
    """
    path = step_dir(root, step)
    rank = _rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a save of this step that was interrupted earlier, or a rolled-back future
    _barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _write_tensors({"model": model_sd, "optim": optim_sd}, path)
        torch.save({"rng": rng_state(), "scheduler": scheduler.state_dict()}, path / f"rank{rank}.pt")
        if rank == 0:
            meta = {"step": step, "model": model_config_of(model).to_params(), "world_size": _world(),
                    "loader": loader.state_dict(), "extra": extra}
            _write_atomic_text(path / META, json.dumps(meta, indent=2) + "\n")
        _barrier()
        if before_commit is not None:
            before_commit(path)
        if rank == 0:
            files = {p.name: _sha256(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != COMMIT}
            _write_atomic_text(path / COMMIT, json.dumps({"step": step, "files": files}, indent=2) + "\n")
    except BaseException:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:
        prune_checkpoints(root, keep)
    return path


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` committed checkpoints; drop older ones and interrupted saves before the newest."""
    entries = list_checkpoints(root)
    committed = [p for _, p, ok in entries if ok]
    if not committed:
        return
    newest = committed[-1]
    doomed = committed[:-keep] if keep > 0 else committed[:-1]
    doomed += [p for _, p, ok in entries if not ok and p.name < newest.name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check COMMIT and every file's sha256; return meta.json. FormatError names the bad file."""
    path = Path(path)
    if not is_committed(path):
        raise FormatError(f"{path} has no {COMMIT} marker: the save never finished", path=str(path), field=COMMIT)
    try:
        manifest = json.loads((path / COMMIT).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path / COMMIT}: unreadable commit marker ({exc})", path=str(path / COMMIT)) from None
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise FormatError(f"{file}: listed in {COMMIT} but missing", path=str(file), field=name)
        if _sha256(file) != digest:
            raise FormatError(f"{file}: sha256 does not match {COMMIT}; the checkpoint file is corrupted",
                              path=str(file), field=name)
    if META not in files:
        raise FormatError(f"{path}: {META} is not part of the commit", path=str(path), field=META)
    return json.loads((path / META).read_text(encoding="utf-8"))


def model_config_of(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if config is None:  # pipeline stages or wrappers keep the Transformer's config on the original module
        config = getattr(getattr(model, "module", None), "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("the model has no ModelConfig in .config")
    return config


def check_same_shape(meta: dict[str, Any], config: ModelConfig, path: Path) -> None:
    """Explicit error when a checkpoint was written for another model shape (RELIABILITY.md 32)."""
    saved, ours = meta["model"], config.to_params()
    differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    if differ:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {ours.get(k)!r}" for k in differ)
        raise ConfigError(f"cannot resume from {path}: it was written for another model shape ({detail})")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loader: Any | None, *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore everything a save wrote into live objects; returns meta.json (``step``, ``extra`` ...).

    A different world size is resharded by torch.distributed.checkpoint for model and optimizer; RNG
    states are then not restored (they are per rank) and the caller reseeds.
    """
    path = Path(path)
    meta = verify_checkpoint(path)
    check_same_shape(meta, model_config_of(model), path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same_world = meta["world_size"] == _world()
    rank_file = path / f"rank{_rank() if same_world else 0}.pt"
    per_rank = torch.load(rank_file, weights_only=True)
    scheduler.load_state_dict(per_rank["scheduler"])
    if restore_rng and same_world:
        set_rng_state(per_rank["rng"])
    if loader is not None:
        loader.load_state_dict(meta["loader"])
    meta["rng_restored"] = restore_rng and same_world
    return meta


def load_model_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The plain (unsharded, Meta-named) weights and shape of a checkpoint, for export and evaluation."""
    from corral.model.llama import Transformer

    path = Path(path)
    meta = verify_checkpoint(path)
    config = ModelConfig.from_params(meta["model"])
    model = Transformer(config)
    state = {"model": model.state_dict()}
    with _quiet_single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    return config, state["model"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as is; a run directory or checkpoints/ directory -> its newest committed checkpoint."""
    path = Path(path)
    if (path / META).exists() or (path / COMMIT).exists() or _STEP_DIR.fullmatch(path.name):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no committed checkpoint in {path}")
