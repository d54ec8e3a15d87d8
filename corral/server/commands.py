"""``corral serve``: the OpenAI- and Ollama-compatible HTTP server (cli.py's COMMANDS names these)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

DESCRIPTION = """Serve models over HTTP: the OpenAI API under /v1 (chat/completions, completions, embeddings,
models), the Ollama API under /api, a chat page at /, /health and /metrics (Prometheus).

Models are stored names (`corral list`; the embedded smollm2:135m registers itself) loaded on
first use, kept for --keep-alive after their last request, and evicted least-recently-used past
--max-loaded. Each model decodes up to --parallel requests together; --queue more may wait, and
anything beyond gets 503 at once."""

EPILOG = """examples:
  corral serve                                  # 127.0.0.1:11435, embedded SmolLM2 on demand
  corral serve --model llama3.2:1b --parallel 8 # preload a stored model; it becomes the default
  CORRAL_API_KEY=secret corral serve --host 0.0.0.0:8080
  curl localhost:11435/v1/chat/completions -d '{"model":"smollm2:135m","messages":[{"role":"user","content":"Hi"}]}'

environment: CORRAL_HOST (host:port, default 127.0.0.1:11435), CORRAL_API_KEY, CORRAL_HOME (the store),
CORRAL_QUANT (default --quant), CORRAL_ORIGINS (browser origins allowed besides the server's own).
See docs/server.md."""


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog, p.formatter_class = DESCRIPTION, EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("--host", default=None, metavar="HOST[:PORT]",
                   help="address to bind (default: $CORRAL_HOST or 127.0.0.1:11435); binding beyond loopback "
                        "without an API key prints a warning")
    p.add_argument("--port", type=int, default=None,
                   help="port (overrides the one in --host / CORRAL_HOST); 0 picks a free one, printed at start")
    p.add_argument("--port-file", default=None, metavar="PATH",
                   help="write the bound port here once listening (useful with --port 0)")
    p.add_argument("--model", action="append", default=None, metavar="NAME|PATH",
                   help="load at start (repeatable); the first is the default for requests naming no model. "
                        "A file path is served under its file name")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="requests decoded together per model, one KV cache slot each (default: 4)")
    p.add_argument("--queue", type=int, default=None, metavar="N",
                   help="requests that may wait for a slot per model before new ones get 503 (default: 64)")
    p.add_argument("--max-loaded", type=int, default=None, metavar="N",
                   help="models kept in memory at once; the least recently used is evicted (default: 2)")
    p.add_argument("--keep-alive", default=None, metavar="DUR",
                   help="how long an idle model stays loaded: seconds or 5m, 1h30m; negative = forever, "
                        "0 = unload after each request (default: 5m)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="context per request slot (default: the model's own)")
    p.add_argument("--quant", choices=["gguf", "none", "int8", "int4"], default=None,
                   help="weights for models stored without a quant: gguf (a GGUF's own blocks, the default for "
                        "GGUF files), none (float32), int8, int4 (default: $CORRAL_QUANT or gguf/as stored)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype after loading (default: float32)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: $CORRAL_API_KEY)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a browser origin besides the server's own allowed to call it, e.g. http://localhost:3000 "
                        "or http://localhost:* (repeatable; added to $CORRAL_ORIGINS, comma-separated)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections at once; more are answered 503 and closed (default: 1000)")
    p.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body accepted; larger gets 413 (default: 8 MiB)")
    p.add_argument("--code-shield", nargs="?", const="block", default=None, choices=["block", "warn"],
                   help="scan the code blocks of every answer for insecure code: block (default) replaces a block "
                        "with an error-severity finding by a notice and appends a warning for the rest; warn only "
                        "appends warnings. Findings are reported as `code_shield` in each response")

    p.add_argument("--guard", nargs="?", const="embedded", default=None, metavar="MODEL",
                   help="moderate input and output with a guard: the embedded one (no MODEL) or a Llama Guard "
                        "model (path or stored name). Unsafe input is refused and unsafe output cut before it "
                        "reaches the client (finish reason content_filter, the category in the text)")
    p.add_argument("--guard-fail-open", action="store_true",
                   help="when the guard itself fails, let the text through (default: cut it, fail closed)")
    p.add_argument("--guard-threshold", type=float, default=None, metavar="P",
                   help="flag at P(unsafe) >= P (default: 0.5 for Llama Guard, the embedded head's own)")
    p.add_argument("--guard-exclude", default=None, metavar="S2,S7",
                   help="categories the guard does not check, comma-separated codes (Llama Guard 3: S1-S14)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")


def config_from_args(args):
    """ServeConfig from flags over CORRAL_* variables over defaults; bad values are ConfigError."""
    import os

    from corral.errors import ConfigError
    from corral.server.state import ServeConfig, parse_keep_alive, split_host_port

    config = ServeConfig.from_env()
    if args.host:
        config.host, config.port = split_host_port(args.host, config.port)
    if args.port is not None:
        if not 0 <= args.port < 65536:
            raise ConfigError(f"--port must be 0-65535 (0: any free port), got {args.port}")
        config.port = args.port
    for flag, attr in (("parallel", "parallel"), ("queue", "max_queue"), ("max_loaded", "max_loaded"),
                       ("context", "context_length"), ("max_body", "max_body_bytes"),
                       ("max_connections", "max_connections")):
        value = getattr(args, flag)
        if value is not None:
            if value < (0 if flag == "queue" else 1):
                raise ConfigError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'queue' else 1}, "
                                  f"got {value}")
            setattr(config, attr, value)
    if args.keep_alive is not None:
        config.keep_alive = parse_keep_alive(args.keep_alive, "--keep-alive")
    config.quant = args.quant or os.environ.get("CORRAL_QUANT") or None
    if config.quant not in (None, "none", "int8", "int4", "gguf"):
        raise ConfigError(f"CORRAL_QUANT must be gguf, none, int8 or int4, got {config.quant!r}")
    config.dtype = args.dtype
    config.api_key = args.api_key or config.api_key
    config.preload = list(args.model or [])
    config.allow_origins += list(args.allow_origin or [])
    config.code_shield = args.code_shield
    config.guard, config.guard_fail_open = args.guard, args.guard_fail_open
    config.guard_threshold = args.guard_threshold
    config.guard_exclude = [c.strip() for c in (args.guard_exclude or "").split(",") if c.strip()]
    if config.guard_threshold is not None and not 0 < config.guard_threshold < 1:
        raise ConfigError(f"--guard-threshold must be between 0 and 1, got {config.guard_threshold}")
    return config


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: the kernel picks a free one). Binding here, not in uvicorn,
    lets the server say which port it got: a test or script starts it on port 0 and reads the port back,
    instead of guessing a free port another process may take first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        from corral.errors import CorralError

        sock.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)  # connections queue from now on, even while models preload
    sock.set_inheritable(True)
    return sock


def announce(sock: socket.socket, port_file: str | None) -> int:
    """Print the URL actually bound (stdout, one line) and write the port to port_file atomically."""
    from corral.checkpoint.atomic import write_atomic

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if port_file:
        write_atomic(Path(port_file), lambda tmp: tmp.write_text(f"{port}\n"))
    print(f"corral serve: listening on http://{shown}:{port}", flush=True)
    return port


def cmd_serve(args) -> int:
    import uvicorn

    from corral.server.app import build_app
    from corral.server.connections import uvicorn_config
    from corral.server.security import warn_if_exposed
    from corral.server.state import ServerState

    config = config_from_args(args)
    host = config.host.strip("[]")
    sock = listen(host, config.port)
    config.port = announce(sock, args.port_file)
    warn_if_exposed(config)
    app = build_app(ServerState.create(config))
    server = uvicorn.Server(uvicorn_config(app, config, host=host, port=config.port, log_level=args.log_level))
    server.run(sockets=[sock])  # the socket bound (and announced) above
    return 0
