"""Build a stored model from a Modelfile: blobs in (verified), then one manifest (atomic).

FROM a GGUF file -> one ``vnd.ollama.image.model`` layer, the file as is. FROM an HF or Meta
directory -> one ``vnd.corral.model.file`` layer per file the loaders read, so nothing is
converted and the tokenizer files travel with the weights. FROM a stored name -> its layers,
with this Modelfile's TEMPLATE, SYSTEM, MESSAGE and LICENSE replacing the base's and its
PARAMETERs merged over the base's.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from corral.checkpoint.load import GGUF_MAGIC, detect_format
from corral.errors import FormatError, ModelNotFoundError
from corral.store import manifest as mt
from corral.store.blobs import Progress
from corral.store.manifest import Descriptor, Manifest, check_layers
from corral.store.modelfile import Modelfile
from corral.store.names import InvalidNameError, ModelName, parse_name
from corral.store.store import Store

ProgressFactory = Callable[[str, int], Progress]
"""(label, total bytes) -> a per-chunk progress callback."""

# Files of a model directory that become layers; everything else (READMEs, .git, images) stays behind.
HF_FILES = re.compile(r"config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json"
                      r"|special_tokens_map\.json|model\.safetensors\.index\.json|[A-Za-z0-9_.-]+\.safetensors")
META_FILES = re.compile(r"params\.json|tokenizer\.model|consolidated\.\d{2}\.pth")


def model_files(path: Path, fmt: str) -> list[Path]:
    """The files of an HF or Meta directory that a stored copy keeps."""
    pattern = HF_FILES if fmt == "hf" else META_FILES
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink() and pattern.fullmatch(p.name))
    if not files:
        raise FormatError("no model files in the directory", path=str(path))
    return files


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = [p for p in sorted(path.iterdir()) if p.is_file() and p.open("rb").read(4) == GGUF_MAGIC]
    if len(found) != 1:
        raise FormatError(f"{len(found)} GGUF files in the directory; name the one to use", path=str(path))
    return found[0]


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def describe(path: Path, fmt: str) -> dict:
    """The config blob: format, family, parameter count, weight type.

    The files are checked as a load checks them (config against every tensor's name and shape, pickles
    opened without running code) from their headers, so nothing is registered that would fail to load
    (RELIABILITY.md 40).
    """
    from corral.checkpoint.load import load_checkpoint

    ckpt = load_checkpoint(path, weights=False)
    config = ckpt.config
    if fmt == "gguf":
        from corral.checkpoint.gguf_reader import read_gguf

        with read_gguf(path) as g:
            kinds = Counter(t.type_name for t in g.tensors.values() if len(t.shape) == 2)
            file_type = kinds.most_common(1)[0][0] if kinds else "F32"
    elif fmt == "hf":
        raw = ckpt.metadata["config"]
        file_type = str(raw.get("torch_dtype") or raw.get("dtype") or "unknown").upper()
    else:
        file_type = "BF16/F32 (.pth)"
    return {"model_format": fmt, "model_family": "llama", "model_families": ["llama"],
            "model_type": _human_count(config.num_params()), "file_type": file_type,
            "context_length": config.max_seq_len, "embedding_length": config.dim, "block_count": config.n_layers}


def _add_file(store: Store, path: Path, kind: str, progress: ProgressFactory | None, title: str | None = None):
    size = path.stat().st_size
    digest, size = store.blobs.add_file(path, progress(title or path.name, size) if progress else None)
    return Descriptor(kind, digest, size, title)


def _text_layer(store: Store, kind: str, text: str) -> Descriptor:
    digest, size = store.blobs.add_bytes(text.encode("utf-8"))
    return Descriptor(kind, digest, size)


def _from_path(store: Store, path: Path, progress: ProgressFactory | None) -> tuple[list[Descriptor], dict]:
    fmt = detect_format(path)
    if fmt == "gguf":
        path = gguf_file(path)
        return [_add_file(store, path, mt.MODEL, progress)], describe(path, fmt)
    config = describe(path, fmt)
    layers = [_add_file(store, p, mt.MODEL_FILE, progress, title=p.name) for p in model_files(path, fmt)]
    return layers, config


def _resolve_from(store: Store, source: str, base_dir: Path) -> tuple[Path | None, ModelName | None]:
    path = (base_dir / Path(source).expanduser())
    if path.exists():
        return path, None
    try:
        name = parse_name(source)
    except InvalidNameError:
        raise ModelNotFoundError(f"FROM {source!r}: no such file, directory or stored model") from None
    if not store.manifest_path(name).is_file():
        raise ModelNotFoundError(f"FROM {source!r}: no such file, directory or stored model")
    return None, name


def _extra_layers(store: Store, mf: Modelfile, base_params: dict, base_dir: Path,
                  progress: ProgressFactory | None) -> list[Descriptor]:
    layers = []
    if mf.template is not None:
        from corral.tokenizer.template import check_template

        check_template(mf.template)  # one that does not compile, or loops past its budget, is refused now
        layers.append(_text_layer(store, mt.TEMPLATE, mf.template))
    if mf.system is not None:
        layers.append(_text_layer(store, mt.SYSTEM, mf.system))
    params = {**base_params, **mf.parameters}
    if params:
        layers.append(_text_layer(store, mt.PARAMS, json.dumps(params, sort_keys=True)))
    if mf.messages:
        layers.append(_text_layer(store, mt.MESSAGES, json.dumps(mf.messages)))
    layers += [_text_layer(store, mt.LICENSE, text) for text in mf.licenses]
    return layers


def _adapter_layer(store: Store, source: str, base: Path, base_dir: Path,
                   progress: ProgressFactory | None) -> Descriptor:
    """One ADAPTER: checked tensor by tensor against the base model, stored as a GGUF LoRA blob.

    A llama.cpp GGUF LoRA file is stored as it is; a PEFT directory is converted to one first, as Ollama
    converts a safetensors adapter, so every stored adapter is one file that llama.cpp can also load.
    """
    from corral.checkpoint.adapter import load_adapter
    from corral.checkpoint.gguf_lora import export_gguf_adapter
    from corral.checkpoint.load import load_checkpoint
    from corral.store.scratch import scratch_dir

    path = base_dir / Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"ADAPTER {source!r}: no such file or directory")
    adapter = load_adapter(path, load_checkpoint(base, weights=False).config)
    if adapter.format == "gguf":
        return _add_file(store, path, mt.ADAPTER, progress)
    with scratch_dir(store.models, "create") as tmp:
        return _add_file(store, export_gguf_adapter(adapter, tmp / "adapter.gguf"), mt.ADAPTER, progress)


def create_model(store: Store, name: str, mf: Modelfile, base_dir: Path = Path("."),
                 progress: ProgressFactory | None = None, quant: str | None = None) -> Manifest:
    """Store the model `mf` describes under `name` and return its manifest."""
    target = parse_name(name)  # a bad name is refused before any byte is written
    with store.locked():
        path, base = _resolve_from(store, mf.from_, base_dir)
        if path is not None:
            layers, config = _from_path(store, path, progress)
            base_params: dict = {}
            base_path = gguf_file(path) if detect_format(path) == "gguf" else path
        else:
            info = store.info(base)
            keep = {mt.MODEL, mt.MODEL_FILE, mt.ADAPTER}
            keep |= {k for k, v in ((mt.TEMPLATE, mf.template), (mt.SYSTEM, mf.system)) if v is None}
            keep |= {mt.MESSAGES} if not mf.messages else set()
            keep |= {mt.LICENSE} if not mf.licenses else set()
            layers = [d for d in info.manifest.layers if d.media_type in keep]
            config, base_params = dict(info.config), info.parameters
            base_path = store.model_path(base) if mf.adapters else None
        if quant is not None:
            config["quant"] = quant
        layers += _extra_layers(store, mf, base_params, base_dir, progress)
        layers += [_adapter_layer(store, a, base_path, base_dir, progress) for a in mf.adapters]
        config["rootfs"] = {"type": "layers", "diff_ids": [d.digest for d in layers]}
        check_layers(layers)
        config_digest, config_size = store.blobs.add_bytes(json.dumps(config, indent=2).encode())
        manifest = Manifest(Descriptor(mt.CONFIG_TYPE, config_digest, config_size), tuple(layers))
        store.write_manifest(target, manifest)
    return manifest
