"""A live Corral server for the safety tests (imported by test_codeshield_server / test_cyberseceval_runner):
tests/server/conftest.py's start_server on a fresh store with the embedded SmolLM2 registered."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _server_helpers():
    spec = importlib.util.spec_from_file_location("server_conftest", ROOT / "tests" / "server" / "conftest.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # registered first: its dataclasses look their module up by name
    return module


@contextlib.contextmanager
def live_server(home: Path, **overrides):
    """A running server on 127.0.0.1 (a free port) over the store at `home`, stopped on exit."""
    from corral.store import Store
    from corral.store.load import ensure_default

    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORRAL_HOME", str(home))
        ensure_default(Store(home))
        server = _server_helpers().start_server(home, **overrides)
        try:
            yield server
        finally:
            server.stop()
