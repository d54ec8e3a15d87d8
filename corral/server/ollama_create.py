"""POST /api/create: an Ollama create request -> a Modelfile -> corral.store.create_model.

Current shape: ``{model, from, files: {name: digest}, adapters: {name: digest}, template, system,
parameters, license, messages, quantize}``; the older ``{model, modelfile: "FROM ..."}`` is read too.
Weights come from a stored model (``from``) or from blobs the client uploaded first
(``POST /api/blobs/<digest>``, then ``files``). Over HTTP a request never names a file on the
server's disk: FROM and ADAPTER must be stored names or uploaded blobs, so a client cannot make the
server read arbitrary files (a path is a 400).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.checkpoint.load import GGUF_MAGIC
from corral.errors import ModelNotFoundError
from corral.server.errors import BadRequest
from corral.server.ollama_wire import Report
from corral.store import Modelfile, create_model, parse_modelfile
from corral.store.manifest import FILE_TITLE
from corral.store.modelfile import ROLES, parse_parameter
from corral.store.names import InvalidNameError, check_digest, parse_name
from corral.store.scratch import scratch_dir

RUNTIME_QUANTS = ("int8", "int4")
GGUF_QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")  # Ollama spells them q4_K_M; compared lowercased


def _stored(store, source: str, field: str) -> str:
    """A FROM that must be a stored model's name (never a path on the server)."""
    try:
        name = parse_name(source)
    except InvalidNameError:
        raise BadRequest([(field, f"{field} {source[:80]!r} is not a model name; over HTTP, upload files with "
                                  "/api/blobs and name them in `files`")]) from None
    if not store.manifest_path(name).is_file():
        raise ModelNotFoundError(f"{field} model {str(name)!r} not found; pull it first")
    return str(name)


def _blob_map(store, value: Any, field: str) -> dict[str, Path]:
    """{file name: digest} of uploaded blobs -> {file name: blob path}."""
    if not isinstance(value, dict) or not value:
        raise BadRequest([(field, f"{field} must be an object of file names to sha256 digests")])
    out = {}
    for name, digest in value.items():
        if not FILE_TITLE.fullmatch(name):
            raise BadRequest([(field, f"{field}: {name[:80]!r} is not a plain file name")])
        try:
            check_digest(digest)
        except InvalidNameError as exc:
            raise BadRequest([(field, f"{field}[{name}]: {exc}")]) from None
        if not store.blobs.has(digest):
            raise BadRequest([(field, f"{field}[{name}]: blob {digest} was not uploaded (POST /api/blobs/{digest})")])
        out[name] = store.blobs.path(digest)
    return out


@contextlib.contextmanager
def _weights(store, files: dict[str, Path]) -> Iterator[str]:
    """What FROM names for uploaded files: the blob itself for one GGUF file, else a scratch directory of
    hard links with the files' names (create_model reads a directory by file name)."""
    if len(files) == 1:
        (path,) = files.values()
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                yield str(path)
                return
    with scratch_dir(store.models, "create") as scratch:  # a killed server leaves it to the next GC
        for name, blob in files.items():
            try:
                os.link(blob, scratch / name)
            except OSError:
                shutil.copyfile(blob, scratch / name)
        yield str(scratch)


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest([("parameters", "parameters must be an object")])
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key == "stop":
            stops = [v] if isinstance(v, str) else v
            if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
                raise BadRequest([("parameters", "parameters.stop must be a string or a list of strings")])
            out["stop"] = list(stops)
        elif isinstance(v, bool) or not isinstance(v, int | float | str):
            raise BadRequest([("parameters", f"parameters.{key} must be a number")])
        else:
            out[key.lower()] = parse_parameter(key, str(v), f"parameters.{key}")  # unknown names: 400
    return out


def _strings(value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else (value or [])
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest([(field, f"{field} must be a string or a list of strings")])
    return items


def _messages(value: Any) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value or []):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadRequest([("messages", f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}")])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest([(key, f"{key} must be a string")])
    return value


def modelfile_of(store, body: dict) -> tuple[Modelfile, dict[str, Path]]:
    """(Modelfile with FROM still unset when files are given, the uploaded files)."""
    if body.get("modelfile") is not None:  # the older API: a Modelfile's text
        text = _text(body, "modelfile") or ""
        mf = parse_modelfile(text, "modelfile")
        mf.from_ = _stored(store, mf.from_, "FROM")
        if mf.adapters:
            raise BadRequest([("modelfile", "ADAPTER paths are not allowed over HTTP; use `adapters` with blobs")])
        return mf, {}
    source, files = body.get("from"), body.get("files")
    if (source is None) == (files is None):
        raise BadRequest([("from", "give exactly one of `from` (a stored model) and `files` (uploaded blobs)")])
    mf = Modelfile(from_=_stored(store, source, "from") if isinstance(source, str) else "",
                   parameters=_parameters(body.get("parameters")), template=_text(body, "template"),
                   system=_text(body, "system"), licenses=_strings(body.get("license"), "license"),
                   messages=_messages(body.get("messages")))
    if source is not None and not isinstance(source, str):
        raise BadRequest([("from", "from must be a model name")])
    if body.get("adapters") is not None:
        mf.adapters = [str(p) for p in _blob_map(store, body["adapters"], "adapters").values()]
    return mf, _blob_map(store, files, "files") if files is not None else {}


def _quantize(store, mf: Modelfile, qtype: str, scratch: Path) -> Modelfile:
    """GGUF mixes (Q4_K_M ... Q4_0): new weights written to scratch; the stored base's template and the rest carry
    over."""
    from corral.store.convert import quantize_gguf

    source = Path(mf.from_)
    if not source.is_file():  # FROM a stored name
        info = store.info(mf.from_)
        source = store.model_path(mf.from_)
        mf = Modelfile(mf.from_, {**info.parameters, **mf.parameters}, mf.template or info.template,
                       mf.system or info.system, mf.adapters, mf.licenses or list(info.licenses),
                       mf.messages or list(info.messages))
    if not source.is_file():
        raise BadRequest([("quantize", f"{qtype} needs GGUF weights; use int8 or int4 for this model")])
    out = quantize_gguf(source, scratch / "model.gguf", qtype.upper())
    return Modelfile(str(out), mf.parameters, mf.template, mf.system, mf.adapters, mf.licenses, mf.messages)


def create_from_request(store, name: str, body: dict, report: Report) -> None:
    parse_name(name)  # a bad target name is refused before any work
    quantize = body.get("quantize")
    if quantize is not None and (not isinstance(quantize, str) or quantize.lower() not in RUNTIME_QUANTS + GGUF_QUANTS):
        raise BadRequest([("quantize", f"quantize must be one of {', '.join(RUNTIME_QUANTS + GGUF_QUANTS)}, "
                                       f"got {quantize!r}")])
    quantize = quantize.lower() if quantize else None
    report({"status": "parsing request"})
    mf, files = modelfile_of(store, body)
    before = set(store.blobs.digests())
    with contextlib.ExitStack() as stack:
        if files:
            mf.from_ = stack.enter_context(_weights(store, files))
        if quantize in GGUF_QUANTS:
            report({"status": f"quantizing to {quantize.upper()}"})
            mf = _quantize(store, mf, quantize, stack.enter_context(scratch_dir(store.models, "quantize")))
        nowhere = stack.enter_context(tempfile.TemporaryDirectory())  # relative paths resolve to nothing
        runtime = quantize if quantize in RUNTIME_QUANTS else None
        manifest = create_model(store, name, mf, Path(nowhere), quant=runtime)
    for d in (*manifest.layers, manifest.config):
        verb = "using existing" if d.digest in before else "creating new"
        report({"status": f"{verb} layer {d.digest}"})
    report({"status": "writing manifest"})
