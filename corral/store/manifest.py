"""Manifests: Docker distribution v2 JSON naming a config blob and the layer blobs of one model.

Same shape and media types as Ollama's store. One addition: an HF or Meta directory is kept
file by file, each file a layer of media type ``application/vnd.corral.model.file`` whose
file name travels in the OCI ``org.opencontainers.image.title`` annotation (docs/store.md).
A manifest is checked in full (digests, counts, sizes, kinds, file names) before anything
is written because of it (RELIABILITY.md 13).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from corral.errors import FormatError
from corral.store.names import InvalidNameError, check_digest

SCHEMA_VERSION = 2
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
SYSTEM = "application/vnd.ollama.image.system"
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"
ADAPTER = "application/vnd.ollama.image.adapter"
MESSAGES = "application/vnd.ollama.image.messages"
MODEL_FILE = "application/vnd.corral.model.file"
TITLE = "org.opencontainers.image.title"

SINGLE_LAYERS = {TEMPLATE, SYSTEM, PARAMS, MESSAGES}  # at most one of each
LAYER_TYPES = SINGLE_LAYERS | {MODEL, LICENSE, ADAPTER, MODEL_FILE}
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 1024
MAX_BLOB_BYTES = 1 << 50  # 1 PiB: anything larger is a corrupt size field, not a model
# A stored file name: one plain path component, never hidden, never "." or "..".
FILE_TITLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    title: str | None = None
    """File name of a MODEL_FILE layer (config.json, model.safetensors, ...)."""

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.title is not None:
            out["annotations"] = {TITLE: self.title}
        return out


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...] = field(default_factory=tuple)

    def to_bytes(self) -> bytes:
        body = {"schemaVersion": SCHEMA_VERSION, "mediaType": MANIFEST_TYPE, "config": self.config.to_json(),
                "layers": [layer.to_json() for layer in self.layers]}
        return (json.dumps(body, indent=2) + "\n").encode()

    def digests(self) -> set[str]:
        return {self.config.digest} | {layer.digest for layer in self.layers}

    def layers_of(self, media_type: str) -> list[Descriptor]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    def total_size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)


def _descriptor(value: object, where: str, path: str | None) -> Descriptor:
    if not isinstance(value, dict):
        raise FormatError("must be a JSON object", path=path, field=where)
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str):
        raise FormatError("mediaType must be a string", path=path, field=where)
    try:
        check_digest(digest)
    except InvalidNameError as exc:
        raise FormatError(str(exc), path=path, field=f"{where}.digest") from None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
        raise FormatError(f"size must be an integer in [0, 2^50], got {size!r}", path=path, field=f"{where}.size")
    annotations = value.get("annotations", {})
    title = annotations.get(TITLE) if isinstance(annotations, dict) else None
    if media_type == MODEL_FILE and not (isinstance(title, str) and FILE_TITLE.fullmatch(title)):
        raise FormatError(f"a model file layer needs a plain file name in {TITLE}, got {str(title)[:80]!r}",
                          path=path, field=where)
    return Descriptor(media_type, digest, size, title if media_type == MODEL_FILE else None)


def check_layers(layers: list[Descriptor], path: str | None = None) -> None:
    """Kinds and counts: one GGUF model layer or a set of model files, at most one of each single layer."""
    if not layers:
        raise FormatError("a manifest needs at least one layer", path=path, field="layers")
    if len(layers) > MAX_LAYERS:
        raise FormatError(f"{len(layers)} layers; the limit is {MAX_LAYERS}", path=path, field="layers")
    kinds = [layer.media_type for layer in layers]
    for kind in set(kinds):
        if kind not in LAYER_TYPES:
            raise FormatError(f"unknown layer media type {kind[:100]!r}", path=path, field="layers")
        if kind in SINGLE_LAYERS and kinds.count(kind) > 1:
            raise FormatError(f"more than one {kind} layer", path=path, field="layers")
    n_model, n_files = kinds.count(MODEL), kinds.count(MODEL_FILE)
    if (n_model == 1) == (n_files > 0) or n_model > 1:
        raise FormatError("a manifest needs exactly one model layer or a set of model file layers",
                          path=path, field="layers")
    titles = [layer.title for layer in layers if layer.title is not None]
    if len(set(titles)) != len(titles):
        raise FormatError("two model file layers have the same file name", path=path, field="layers")


def parse_manifest(data: bytes, path: str | None = None) -> Manifest:
    """Check a manifest completely and return it; FormatError names the first field that is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}", path=path)
    body = _json_object(data, "manifest", path)
    if body.get("schemaVersion") != SCHEMA_VERSION:
        raise FormatError(f"must be {SCHEMA_VERSION}, got {body.get('schemaVersion')!r}", path=path,
                          field="schemaVersion")
    if body.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise FormatError(f"must be {MANIFEST_TYPE}", path=path, field="mediaType")
    config = _descriptor(body.get("config"), "config", path)
    if config.media_type != CONFIG_TYPE:
        raise FormatError(f"must be {CONFIG_TYPE}", path=path, field="config.mediaType")
    raw_layers = body.get("layers")
    if not isinstance(raw_layers, list):
        raise FormatError("must be a list", path=path, field="layers")
    if len(raw_layers) > MAX_LAYERS:  # checked before building a descriptor for each
        raise FormatError(f"{len(raw_layers)} layers; the limit is {MAX_LAYERS}", path=path, field="layers")
    layers = [_descriptor(layer, f"layers[{i}]", path) for i, layer in enumerate(raw_layers)]
    check_layers(layers, path)
    return Manifest(config, tuple(layers))


def parse_config(data: bytes, path: str | None = None) -> dict:
    """The config blob: a small JSON object (model_format, model_family, file_type, ...)."""
    return _json_object(data, "model config", path)


def _json_object(data: bytes, what: str, path: str | None) -> dict:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON ({exc})", path=path) from None
    if not isinstance(body, dict):
        raise FormatError(f"{what} is not a JSON object", path=path)
    return body
