"""The loaded models of a server: load on demand, keep alive for a while, evict the least recently used.

Life of a model in the pool:

    get(name) -> (not loaded) load in a worker thread, one lock per name so two requests never load twice
              -> active += 1; release(model) -> active -= 1
    active == 0 -> expires_at = now + keep_alive (keep_alive < 0: never; 0: unloaded at once)
    a new model past max_loaded -> the least recently used one is evicted first

Eviction and unload are *draining*: the model leaves the pool at once (new requests load a fresh
copy), the requests already running on it finish normally, and its scheduler closes when the last
one releases. Nothing a client already waits for is cancelled by another client's load.

HTTP clients name stored models only (``smollm2:135m``, ``llama3.2:1b``...). A file path loads only
when the server's operator registered it (``corral serve --model PATH``), so a request cannot make
the server open arbitrary files.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, CorralError, ModelNotFoundError
from corral.server.errors import ModelLoadError
from corral.store.load import DEFAULT_NAME, ensure_default, is_default, load_stored

DEFAULT_MODEL = DEFAULT_NAME
DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's default of 5 minutes


class ModelNotFound(ModelNotFoundError):
    """The requested model is neither stored nor registered (404 in each dialect)."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, field_name: str = "keep_alive") -> float | None:
    """Seconds from a number (seconds) or a Go duration string ("10m", "1h30m", "-1", "0"); None if absent.

    Negative means keep the model loaded forever; 0 unloads it when the request ends.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{field_name} must be a number of seconds or a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"{field_name} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return parse_keep_alive(float(text), field_name) if text else None
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION_PART.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    raise ConfigError(f"{field_name} must be a number of seconds or a duration like '5m' or '1h30m', got {value!r}")


@dataclass
class LoadOptions:
    """How the pool loads every model (from `corral serve` flags / ServeConfig)."""

    parallel: int = 4
    """Requests decoded together per model (the engine's max_batch_size, one KV cache slot each)."""
    max_queue: int = 64
    """Requests waiting for a slot before new ones get 503."""
    context_length: int | None = None
    """Tokens per slot (prompt + answer); None = the model's own context."""
    quant: str | None = None
    """None | "int8" | "int4" | "gguf" for models stored without a quant of their own."""
    dtype: str | None = None
    """None (float32) | "bfloat16" | "float16"."""


@dataclass
class LoadedModel:
    name: str
    """Store name ("smollm2:135m") or the registered alias of a path."""
    llm: Any
    """corral.llm.LLM"""
    scheduler: Any
    """corral.engine.scheduler.Scheduler"""
    digest: str
    size_bytes: int
    loaded_at: float
    expires_at: float | None = None
    """Unix time it unloads when idle; None while requests run or when kept forever."""
    details: dict = field(default_factory=dict)
    """format, family, families, parameter_size, quantization_level (Ollama's /api/tags shape)."""
    last_used: float = 0.0
    keep_alive: float = DEFAULT_KEEP_ALIVE
    """Seconds it stays loaded once idle, as the last request asked (< 0 forever, 0 unload at once)."""
    active: int = 0
    """Requests holding it (between pool.get and pool.release)."""
    options: dict = field(default_factory=dict)
    """Stored Modelfile PARAMETERs (Ollama names: temperature, num_predict, stop...): request defaults."""
    system: str | None = None
    """Stored SYSTEM message, for requests that bring none."""
    closing: bool = False
    """Evicted or unloaded: closes when the last active request releases it."""

    @property
    def context_length(self) -> int:
        return self.llm.engine.max_seq_len

    def close(self) -> None:
        self.scheduler.close()


def load_model(store, name: str, path: Path | None, options: LoadOptions) -> LoadedModel:
    """Load a stored model (path None) or a registered file (worker thread: this takes seconds)."""
    import torch

    from corral.engine.scheduler import Scheduler
    from corral.llm import load

    kwargs = {"max_batch_size": options.parallel, "max_seq_len": options.context_length}
    if options.dtype:
        kwargs["dtype"] = getattr(torch, options.dtype)
    if path is None:  # a stored model: its manifest, quant, PARAMETERs and SYSTEM come with it
        llm, info = load_stored(store, name, quant=options.quant, **kwargs)
        path, config = store.model_path(name), info.config
        quant = config.get("quant") or options.quant
        manifest, size = info.manifest.to_bytes(), info.manifest.total_size()
        defaults, system = dict(info.parameters), info.system
    else:  # a file the operator registered (corral serve --model PATH)
        llm, quant, config = load(path, quant=options.quant, **kwargs), options.quant, {}
        llm.name = name
        manifest, size = str(path.resolve()).encode(), _path_size(path)
        defaults, system = {}, None
    details = {"format": config.get("model_format", path.suffix.lstrip(".") or "dir"),
               "family": config.get("model_family", "llama"), "families": config.get("model_families", ["llama"]),
               "parameter_size": config.get("model_type", ""),
               "quantization_level": quant or config.get("file_type", "")}
    now = time.time()
    return LoadedModel(name, llm, Scheduler(llm.engine, max_queue=options.max_queue),
                       "sha256:" + hashlib.sha256(manifest).hexdigest(), size, now, details=details, last_used=now,
                       options=defaults, system=system)


def _path_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ModelPool:
    """Loaded models by name, most recently used last. All methods run on the event loop's thread."""

    def __init__(self, store, options: LoadOptions | None = None, *, max_loaded: int = 2,
                 keep_alive: float = DEFAULT_KEEP_ALIVE, default_model: str = DEFAULT_MODEL, loader=load_model):
        if max_loaded < 1:
            raise ConfigError(f"max_loaded must be at least 1, got {max_loaded}")
        self.store, self.options = store, options or LoadOptions()
        self.max_loaded, self.keep_alive, self.default_model = max_loaded, keep_alive, default_model
        self.loader = loader
        """(store, name, path | None, LoadOptions) -> LoadedModel; tests swap it to wrap the model."""
        self.paths: dict[str, Path] = {}
        """Operator-registered aliases -> model files (corral serve --model PATH)."""
        self.loads = 0
        """Models loaded since start (metrics)."""
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: list[LoadedModel] = []

    # -- names ----------------------------------------------------------------------------------
    def register_path(self, path: str | Path, alias: str | None = None) -> str:
        path = Path(path)
        if not path.exists():
            raise ModelNotFound(f"no model file or directory at {path}")
        alias = alias or path.name
        self.paths[alias] = path
        return alias

    def resolve(self, name: str | None) -> str:
        """The pool key for a requested name: a registered alias, or the canonical store name."""
        from corral.store.names import parse_name

        if name is None or name == "":
            name = self.default_model
        if not isinstance(name, str):
            raise ConfigError(f"model must be a string, got {type(name).__name__}")
        if name in self.paths:
            return name
        return str(parse_name(name))  # InvalidNameError (400) for names that could never be stored

    def _locate(self, key: str) -> Path | None:
        """Raise ModelNotFound unless key is loadable; the path for a registered alias, else None."""
        if key in self.paths:
            return self.paths[key]
        from corral.store.names import parse_name

        if not self.store.manifest_path(parse_name(key)).is_file():
            if not is_default(key):
                raise ModelNotFound(f"model {key!r} not found; `corral list` shows the stored models")
            ensure_default(self.store)  # the embedded SmolLM2 registers itself the first time it is asked for
        return None

    # -- get / release ----------------------------------------------------------------------------
    async def get(self, name: str | None, keep_alive: float | None = None) -> LoadedModel:
        """The loaded model for name (loading it if needed), held until release()."""
        key = self.resolve(name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            model = self._models.get(key)
            if model is None:
                path = await asyncio.to_thread(self._locate, key)
                while len(self._models) >= self.max_loaded:  # make room before the new weights arrive
                    self._evict(next(iter(self._models)))
                model = await asyncio.to_thread(self._load, key, path)
                self._models[key] = model
                self.loads += 1
                while len(self._models) > self.max_loaded:  # another name loaded meanwhile
                    self._evict(next(k for k in self._models if k != key))
            self._models.move_to_end(key)
            model.active += 1
            model.last_used, model.expires_at = time.time(), None
            # Ollama's rule: each request sets how long the model stays after it (absent = the server default).
            model.keep_alive = keep_alive if keep_alive is not None else self.keep_alive
        return model

    def hold(self, model: LoadedModel) -> None:
        """One more request holds a model it already holds (a batch of prompts); each release()s once."""
        model.active += 1

    def _load(self, key: str, path: Path | None) -> LoadedModel:
        try:
            return self.loader(self.store, key, path, self.options)
        except (ModelNotFoundError, ModelLoadError):
            raise
        except (CorralError, OSError, RuntimeError, MemoryError) as exc:
            raise ModelLoadError(f"cannot load model {key!r}: {exc}") from exc

    def release(self, model: LoadedModel) -> None:
        """A request on model ended; applies keep_alive and finishes a draining close."""
        model.active = max(0, model.active - 1)
        model.last_used = time.time()
        if model.active:
            return
        if model.closing:
            self._close(model)
        elif model.keep_alive == 0:
            self._evict(model.name)
        elif model.keep_alive > 0:
            model.expires_at = model.last_used + model.keep_alive

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def draining(self) -> list[LoadedModel]:
        """Evicted or unloaded models whose last requests still run."""
        return list(self._closing)

    def find(self, name: str | None) -> LoadedModel | None:
        """The loaded model for name, without loading or holding it."""
        return self._models.get(self.resolve(name))

    async def unload(self, name: str) -> bool:
        """Drop a model now (draining its running requests); False when it was not loaded."""
        key = self.resolve(name)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._models:
                return False
            self._evict(key)
            return True

    def _evict(self, key: str) -> None:
        model = self._models.pop(key)
        model.closing, model.expires_at = True, None
        if model.active == 0:
            self._close(model)
        else:
            self._closing.append(model)

    def _close(self, model: LoadedModel) -> None:
        if model in self._closing:
            self._closing.remove(model)
        model.close()  # stops the scheduler's worker thread; the weights go with the last reference
        release_freed_memory()

    # -- housekeeping -----------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> list[str]:
        """Unload idle models whose keep_alive ran out; their names."""
        now = time.time() if now is None else now
        gone = [k for k, m in self._models.items() if not m.active and m.expires_at is not None
                and m.expires_at <= now]
        for key in gone:
            self._evict(key)
        return gone

    async def run_expiry(self, every: float = 1.0) -> None:
        """The background task that applies keep_alive (started by the app's lifespan)."""
        while True:
            await asyncio.sleep(every)
            self.expire()

    def close(self) -> None:
        """Server shutdown: every scheduler stops, cancelling what still runs."""
        for key in list(self._models):
            model = self._models.pop(key)
            model.closing = True
            self._close(model)
        for model in list(self._closing):
            self._close(model)


def release_freed_memory() -> None:
    """Hand the pages glibc keeps after a model closes back to the OS. Without it RSS climbs with every
    load/unload cycle (417 -> 967 MiB over 15 keep_alive-0 cycles, flat ~540 with it) though nothing leaks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): those allocators return memory their own way
        return
    gc.collect()  # the model's tensors go now, not at the next collection
    libc.malloc_trim(0)
