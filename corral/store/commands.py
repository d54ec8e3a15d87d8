"""Store subcommands for ``corral``: create, import, list, show, cp, rm, verify, ps, pull, push,
convert, quantize. Each is a ``cmd_*`` handler and, where it takes any, an ``*_arguments`` function;
cli.py's COMMANDS table wires them. Handlers import what they use."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_HOST = "127.0.0.1:11435"  # Ollama's port + 1, so both can run side by side; CORRAL_HOST overrides


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


class Bars:
    """tqdm byte bars on stderr (hidden when stderr is not a terminal), closed together at the end."""

    def __init__(self):
        self.bars = []

    def __call__(self, label: str, total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                   disable=None, leave=False)
        self.bars.append(bar)
        return bar.update

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars:
            bar.close()


def _store():
    from corral.store import Store

    return Store()


def cmd_create(args) -> int:
    from corral.store import create_model, parse_modelfile

    path = Path(args.file)
    text = _read_modelfile(path)
    started = time.perf_counter()
    with Bars() as bars:
        manifest = create_model(_store(), args.name, parse_modelfile(text, str(path)), path.parent, bars)
    print(f"created {args.name} ({human_size(manifest.total_size())}, {len(manifest.layers)} layers) "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _read_modelfile(path: Path) -> str:
    """A Modelfile's text; a missing, special or non-UTF-8 file is one clear error naming the line."""
    from corral.errors import FormatError
    from corral.store.modelfile import MAX_MODELFILE_BYTES

    if not path.is_file():
        raise FileNotFoundError(f"no Modelfile at {path}" + (" (not a regular file)" if path.exists() else ""))
    with open(path, "rb") as f:
        data = f.read(MAX_MODELFILE_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FormatError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}", path=str(path),
                          field=f"line {line}") from None


def cmd_import(args) -> int:
    """A GGUF file, an HF or Meta directory, or a .tar written by `corral push`."""
    import tarfile

    from corral.store import Modelfile, create_model
    from corral.store.transfer import import_archive

    path = Path(args.path)
    started = time.perf_counter()
    with Bars() as bars:
        if path.is_file() and tarfile.is_tarfile(path):
            names = [str(n) for n in import_archive(_store(), path, args.name, bars)]
        else:
            name = args.name or _name_from_path(path)
            create_model(_store(), name, Modelfile(from_=str(path.resolve())), progress=bars)
            names = [name]
    print(f"imported {', '.join(names)} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _name_from_path(path: Path) -> str:
    import re

    stem = re.sub(r"[^a-z0-9._-]+", "-", path.resolve().name.lower().removesuffix(".gguf")).strip("-._")
    return stem[:80] or "model"


def cmd_list(args) -> int:
    entries = _store().entries()
    if args.json:
        print(json.dumps([{"name": str(e.name), "model": str(e.name), "digest": e.digest, "size": e.size,
                           "modified_at": e.modified} for e in entries], indent=2))
        return 0
    rows = [(str(e.name), e.digest[7:19], human_size(e.size), human_age(time.time() - e.modified)) for e in entries]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("NAME", "ID", "SIZE", "MODIFIED"))]
    for row in [("NAME", "ID", "SIZE", "MODIFIED"), *rows]:
        print("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _modelfile_of(store, info) -> str:
    from corral.store import Modelfile, render_modelfile
    from corral.store.manifest import ADAPTER, MODEL

    model = info.manifest.layers_of(MODEL)
    source = store.blobs.path(model[0].digest) if model else store.model_path(info.name)
    return render_modelfile(Modelfile(str(source), dict(info.parameters), info.template, info.system,
                                      [str(store.blobs.path(d.digest)) for d in info.manifest.layers_of(ADAPTER)],
                                      list(info.licenses), list(info.messages)))


def cmd_show(args) -> int:
    store = _store()
    info = store.info(args.name)
    if args.json:
        print(json.dumps({"name": str(info.name), "details": info.config, "parameters": info.parameters,
                          "template": info.template, "system": info.system, "license": info.licenses,
                          "messages": info.messages, "modelfile": _modelfile_of(store, info),
                          "manifest": json.loads(info.manifest.to_bytes())}, indent=2))
        return 0
    if args.modelfile:
        print(_modelfile_of(store, info), end="")
    elif args.parameters:
        for key, value in info.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                print(f"{key:<16}{json.dumps(item) if isinstance(item, str) else item}")
    elif args.template:
        print(info.template or "(no template stored: the model's own chat template is used)")
    elif args.system:
        print(info.system or "")
    elif args.license:
        print("\n\n".join(info.licenses))
    else:
        _show_summary(info)
    return 0


def _show_summary(info) -> None:
    c = info.config
    print("  Model")
    for label, key in (("architecture", "model_family"), ("parameters", "model_type"), ("format", "model_format"),
                       ("context length", "context_length"), ("embedding length", "embedding_length"),
                       ("quantization", "file_type"), ("runtime quant", "quant")):
        if c.get(key) is not None:
            print(f"    {label:<20}{c[key]}")
    if info.parameters:
        print("\n  Parameters")
        for key, value in info.parameters.items():
            print(f"    {key:<20}{json.dumps(value) if not isinstance(value, (int, float)) else value}")
    if info.system:
        print("\n  System\n    " + info.system.strip().replace("\n", "\n    "))
    if info.licenses:
        print("\n  License\n    " + info.licenses[0].strip().splitlines()[0])


def cmd_cp(args) -> int:
    dest = _store().copy(args.source, args.dest)
    print(f"copied '{args.source}' to '{dest}'", file=sys.stderr)
    return 0


def cmd_rm(args) -> int:
    store = _store()
    for name in args.names:
        removed, freed = store.remove(name)
        print(f"deleted '{removed}' (freed {human_size(freed)})", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    store = _store()
    total = sum(store.blobs.path(d).stat().st_size for d in store.blobs.digests())
    from tqdm import tqdm

    with tqdm(total=total, desc="verifying", unit="B", unit_scale=True, file=sys.stderr, disable=None,
              leave=False) as bar:
        problems = store.verify(bar.update)
    for problem in problems:
        print(problem)
    leftovers = store.leftovers()
    for path, size in leftovers:  # not damage: space a killed command left; the next `rm` or quantize frees it
        print(f"leftover {path.relative_to(store.home)} ({human_size(size)}) from a killed command; "
              "the next `corral rm` or `corral quantize` removes it")
    left = f", {len(leftovers)} leftovers ({human_size(sum(s for _, s in leftovers))})" if leftovers else ""
    print(f"{len(store.blobs.digests())} blobs ({human_size(total)}), {len(store.entries())} models: "
          f"{'OK' if not problems else f'{len(problems)} problems'}{left}", file=sys.stderr)
    return 1 if problems else 0


def cmd_ps(args) -> int:
    """Models a running server holds, as `ollama ps` shows them: NAME, ID, SIZE, PROCESSOR, UNTIL."""
    import urllib.error
    import urllib.request

    from corral.errors import CorralError

    host = os.environ.get("CORRAL_HOST") or DEFAULT_HOST
    url = (host if "://" in host else f"http://{host}").rstrip("/") + "/api/ps"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            body = json.loads(response.read(1 << 20))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CorralError(f"no Corral server answers at {host} ({getattr(exc, 'reason', exc)}); "
                          "start one with `corral serve` or set CORRAL_HOST") from None
    models = body.get("models", []) if isinstance(body, dict) else []
    rows = [(str(m.get("name", "?")), str(m.get("digest", "")).removeprefix("sha256:")[:12],
             human_size(m.get("size") or 0), _processor(m.get("size") or 0, m.get("size_vram") or 0),
             _until(m.get("expires_at"))) for m in models if isinstance(m, dict)]
    header = ("NAME", "ID", "SIZE", "PROCESSOR", "UNTIL")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _auth_headers() -> dict:
    key = os.environ.get("CORRAL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _processor(size: int, vram: int) -> str:
    if size <= 0 or vram <= 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def _until(expires_at) -> str:
    """Ollama's UNTIL column: "Forever", "Stopping...", or "4 minutes from now"."""
    import datetime

    if not expires_at:
        return "Forever"
    try:
        when = datetime.datetime.fromisoformat(str(expires_at).replace("Z", "+00:00"))
    except ValueError:
        return str(expires_at)
    left = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    if left <= 0:
        return "Stopping..."
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n > 1 else ''} from now"
    return "Less than a second from now"


def _server(location: str) -> str | None:
    """The server URL when location names one (http(s)://... or host:port) rather than a path."""
    from corral.store.remote import server_url

    return None if Path(location).exists() else server_url(location)


def _open_store_dir(location: str):
    from corral.errors import ModelNotFoundError
    from corral.store import Store

    if not Path(location).is_dir():
        raise ModelNotFoundError(f"no store directory at {location}")
    return Store(location)


def cmd_pull(args) -> int:
    """Copy a model from another store (a directory holding models/, e.g. another CORRAL_HOME), a .tar,
    or a Corral server (http(s)://host:port or host:port)."""
    import tarfile

    from corral.store.transfer import copy_between, import_archive

    started = time.perf_counter()
    with Bars() as bars:
        if (url := _server(args.source)) is not None:
            from corral.store import remote

            names = [remote.pull(_store(), f"{url}/{args.name}", local_name=args.as_name,
                                 api_key=os.environ.get("CORRAL_API_KEY"),
                                 progress=lambda digest, total: bars(digest[7:19], total))]
        elif Path(args.source).is_file() and tarfile.is_tarfile(args.source):
            names = import_archive(_store(), Path(args.source), args.as_name, bars)
        else:
            names = [copy_between(_open_store_dir(args.source), args.name, _store(), args.as_name, bars)]
    print(f"pulled {', '.join(map(str, names))} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_push(args) -> int:
    """Copy a model to another store directory, to a .tar archive when DEST ends in .tar, or to a Corral
    server (http(s)://host:port or host:port)."""
    from corral.store import Store
    from corral.store.transfer import copy_between, export_archive

    started = time.perf_counter()
    with Bars() as bars:
        if not args.dest.endswith(".tar") and (url := _server(args.dest)) is not None:
            from corral.store import remote

            remote.push(_store(), args.name, url, api_key=os.environ.get("CORRAL_API_KEY"),
                        progress=lambda digest, total: bars(digest[7:19], total))
        elif args.dest.endswith(".tar"):
            export_archive(_store(), args.name, Path(args.dest), bars)
        else:
            copy_between(_store(), args.name, Store(args.dest), None, bars)
    print(f"pushed {args.name} to {args.dest} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _source_path(source: str) -> Path:
    """A path as given, or the model path of a stored name."""
    path = Path(source)
    return path if path.exists() else _store().model_path(source)


def _path_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_convert(args) -> int:
    from tqdm import tqdm

    from corral.store.convert import convert_checkpoint

    source, started = _source_path(args.source), time.perf_counter()
    with tqdm(total=2, desc="convert", file=sys.stderr, disable=None, leave=False) as bar:
        def step(phase: str) -> None:
            bar.set_description(phase)
            bar.update(1 if phase != "reading" else 0)

        notes = convert_checkpoint(source, Path(args.dest), args.format, args.qtype, step)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"converted {args.source} ({human_size(_path_size(source))}) to {args.format} {args.dest} "
          f"({human_size(_path_size(Path(args.dest)))}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    """GGUF mixes (llama.cpp's per-tensor types and blocks) write new weights; int8/int4 store a model that is
    quantized when it loads."""
    from corral.store import Modelfile, create_model
    from corral.store.convert import RUNTIME_QUANTS, quantize_gguf
    from corral.store.scratch import scratch_dir

    store, started = _store(), time.perf_counter()
    source = _source_path(args.source)
    new_name = args.name or f"{args.source.split(':')[0]}:{args.type.lower()}"
    if args.type in RUNTIME_QUANTS:
        create_model(store, new_name, Modelfile(from_=args.source), quant=args.type)
        print(f"created {new_name}: {args.source} loaded with {args.type} weights (no new blob) "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 0
    from tqdm import tqdm

    with scratch_dir(store.models, "quantize") as scratch:  # a kill leaves it to the next GC (RELIABILITY 45)
        out = Path(args.output) if args.output else scratch / "model.gguf"
        total = _path_size(source)
        with tqdm(total=total, desc=f"quantize {args.type}", unit="B", unit_scale=True, file=sys.stderr,
                  disable=None, leave=False) as bar:
            quantize_gguf(source, out, args.type, bar.update)
        if not args.output:
            base = args.source if not Path(args.source).exists() else None
            mf = Modelfile(from_=str(out))
            if base:  # keep the base model's template, system, parameters and license
                info = store.info(base)
                mf = Modelfile(str(out), dict(info.parameters), info.template, info.system, [],
                               list(info.licenses), list(info.messages))
            create_model(store, new_name, mf)
    where = args.output or new_name
    size = _path_size(Path(args.output)) if args.output else store.info(new_name).manifest.total_size()
    print(f"quantized {args.source} ({human_size(total)}) to {args.type} {where} ({human_size(size)})"
          f" in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


# -- arguments: cli.py's COMMANDS names each of these beside its cmd_* handler ----------------------
def create_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="[host/][namespace/]model[:tag]")
    p.add_argument("-f", "--file", default="Modelfile", help="Modelfile path (default: ./Modelfile)")


def import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("name", nargs="?", default=None, help="name to store it under (default: from the path)")


def list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    for flag in ("--modelfile", "--parameters", "--template", "--system", "--license", "--json"):
        group.add_argument(flag, action="store_true")


def cp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source")
    p.add_argument("dest")


def rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="name")


def pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="model name in the source (ignored for a .tar)")
    p.add_argument("--from", dest="source", required=True,
                   help="a store directory (holding models/), a .tar, or a server: http(s)://host:port or host:port")
    p.add_argument("--as", dest="as_name", default=None, help="store it under another name")


def push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--to", dest="dest", required=True,
                   help="a store directory, a file name ending in .tar, or a server: http(s)://host:port or host:port")


def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a stored model name or a GGUF file / HF or Meta directory")
    p.add_argument("dest", help="output file (gguf) or directory (hf, meta)")
    p.add_argument("--format", required=True, choices=["gguf", "hf", "meta"])
    p.add_argument("--qtype", default="F32", choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M"],
                   help="GGUF weight type (a llama.cpp mix)")


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a stored model name or a model path")
    p.add_argument("--type", required=True, choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "int8", "int4"])
    p.add_argument("--name", default=None, help="stored name of the result (default: MODEL:<type>)")
    p.add_argument("-o", "--output", default=None, help="write a GGUF file here instead of storing it")
