"""The one chat loop in the terminal: ``corral run [NAME] [PROMPT]`` and ``corral chat [MODEL]``.

``corral run`` opens a stored model (``corral.store.load.load_stored``): its PARAMETERs become the
sampling defaults, SYSTEM the system message, MESSAGEs the opening history. ``corral chat`` opens a
model file with the sampling flags as its parameters (cli.py). Both then run ``repl``. Ctrl+C raises
KeyboardInterrupt inside the streaming callback loop, which ends that answer; the session goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from corral.errors import CorralError
from corral.store.load import DEFAULT_NAME, ensure_default, is_default, load_stored

HELP = """Available commands:
  /set parameter NAME VALUE   temperature, top_p, top_k, min_p, repeat_penalty, seed, num_predict, stop
  /set system TEXT            set the system message
  /show info|parameters|system|template|license
  /clear                      forget the conversation
  /save NAME                  store this model with the current parameters, system and conversation
  /load NAME                  switch to another stored model
  /bye                        exit (also /exit, /quit)
Use \"\"\" to begin and end a multi-line message. Ctrl+C stops an answer; Ctrl+D exits."""


@dataclass
class Session:
    name: str
    llm: Any
    options: dict[str, Any] = field(default_factory=dict)
    """Ollama parameter names -> values (PARAMETER defaults, then /set parameter)."""
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    info: Any = None
    """The stored model's ModelInfo; None for a model file (`corral chat`)."""
    from_: str | None = None
    """What /save writes as FROM: the model file for `corral chat`; None means the stored name."""


def open_session(store, name: str) -> Session:
    llm, info = load_stored(store, name)
    return Session(llm.name, llm, dict(info.parameters), info.system, list(info.messages), info)


def sampling_kwargs(session: Session) -> tuple[dict, list[str]]:
    """Corral keyword arguments for the session's options, and the options this engine cannot apply yet."""
    from corral.store.modelfile import PARAMETERS

    kwargs, ignored = {}, []
    for key, value in session.options.items():
        target = PARAMETERS.get(key, (None, None))[1]  # LLM.generate's keyword (stop or a SamplingParams field)
        if target is not None:
            kwargs[target] = value
        else:
            ignored.append(key)
    return kwargs, ignored


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def answer(session: Session, prompt: str) -> str:
    """Stream one assistant turn for `prompt`; on Ctrl+C the turn is dropped and KeyboardInterrupt re-raised."""
    messages = ([{"role": "system", "content": session.system}] if session.system else []) + session.history
    messages.append({"role": "user", "content": prompt})
    kwargs, _ = sampling_kwargs(session)
    result = session.llm.chat(messages, on_text=_write, **kwargs)
    _write("\n")
    session.history += [messages[-1], {"role": "assistant", "content": result.text}]
    return result.text


def _set(session: Session, rest: str) -> None:
    from corral.store.modelfile import parse_parameter

    what, _, value = rest.partition(" ")
    if what == "system":
        session.system = value.strip().strip('"') or None
        print("Set system message.")
    elif what == "parameter":
        key, _, raw = value.strip().partition(" ")
        parsed = parse_parameter(key, raw.strip())
        key = key.lower()
        session.options[key] = session.options.get(key, []) + [parsed] if key == "stop" else parsed
        _, ignored = sampling_kwargs(session)
        print(f"Set parameter '{key}' to '{raw.strip()}'" + (" (this engine does not apply it yet)"
                                                            if key in ignored else ""))
    else:
        print("Usage: /set parameter NAME VALUE | /set system TEXT")


def _show(session: Session, what: str) -> None:
    info = session.info
    if what == "info":
        c = info.config if info is not None else {}
        print(f"  Model\n    name          {session.name}\n    parameters    {c.get('model_type')}"
              f"\n    format        {c.get('model_format')}\n    quantization  {c.get('file_type')}"
              f"\n    context       {session.llm.config.max_seq_len}")
    elif what == "parameters":
        for key, value in session.options.items():
            print(f"{key:<16}{json.dumps(value) if isinstance(value, (str, list)) else value}")
    elif what == "system":
        print(session.system or "No system message was specified.")
    elif what == "template":
        print((info and info.template) or "(the model's own chat template)")
    elif what == "license":
        print("\n\n".join(info.licenses if info is not None else []) or "No license was specified.")
    else:
        print("Usage: /show info|parameters|system|template|license")


def _save(store, session: Session, name: str) -> None:
    from corral.store import Modelfile, create_model

    mf = Modelfile(from_=session.from_ or session.name, parameters=dict(session.options), system=session.system,
                   messages=list(session.history))
    create_model(store, name, mf)
    print(f"Created new model '{name}'")


def _read_message(prompt: str = ">>> ") -> str:
    """One message: a line, or everything between a line starting with \"\"\" and the next \"\"\"."""
    line = input(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    lines = []
    while '"""' not in text:
        lines.append(text)
        text = input("... ")
    lines.append(text[: text.index('"""')])
    return "\n".join(lines).strip("\n")


def _setup_history(store):
    if not sys.stdin.isatty():  # piped input (`corral chat < questions.txt`) is not a history to keep
        return None
    try:
        import readline
    except ImportError:  # no readline (Windows): input() still works, without history
        return None
    path = store.home / "history"
    store.home.mkdir(parents=True, exist_ok=True)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return lambda: readline.write_history_file(path)


def _command(store, session: Session, line: str) -> Session | None:
    """Run a /command; returns the (maybe new) session, or None to exit."""
    word, _, rest = line.strip().partition(" ")
    if word in ("/bye", "/exit", "/quit"):
        return None
    if word == "/set":
        _set(session, rest.strip())
    elif word == "/show":
        _show(session, rest.strip())
    elif word == "/clear":
        session.history.clear()
        print("Cleared session context")
    elif word == "/save" and rest.strip():
        _save(store, session, rest.strip())
    elif word == "/load" and rest.strip():
        print(f"Loading model '{rest.strip()}'")
        return open_session(store, rest.strip())
    elif word in ("/?", "/help"):
        print(HELP)
    else:
        print(f"Unknown command '{word}'. Type /? for help")
    return session


def repl(store, session: Session) -> int:
    """Chat until /bye or Ctrl+D: each line is a user turn, or a /command."""
    save_history = _setup_history(store)
    print(f"Chatting with {session.name}. /? for help, /bye to exit.", file=sys.stderr)
    try:
        while True:
            try:
                line = _read_message()
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    session = _command(store, session, line)
                    if session is None:
                        return 0
                else:
                    answer(session, line)
            except KeyboardInterrupt:
                print("\n[stopped]")
            except CorralError as exc:
                print(f"error: {exc}")
    finally:
        if save_history:
            save_history()


def cmd_run(args) -> int:
    """Answer PROMPT (or piped stdin) once and exit; with neither, chat in the terminal."""
    from corral.store import Store

    store = Store()
    name = args.model or DEFAULT_NAME
    if is_default(name):
        ensure_default(store)
    session = open_session(store, name)
    prompt = " ".join(args.prompt) if args.prompt else None
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        prompt = f"{prompt}\n\n{piped}" if prompt and piped.strip() else (prompt or piped)
        if not prompt.strip():
            raise CorralError("no prompt: give one as an argument or on stdin")
    if prompt is not None:
        answer(session, prompt)
        return 0
    return repl(store, session)


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=f"stored model name (default: {DEFAULT_NAME})")
    p.add_argument("prompt", nargs="*", help="answer this and exit")
