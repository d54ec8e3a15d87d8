"""`corral serve` flags and CORRAL_* variables -> ServeConfig (no server started)."""

import pytest

from corral.cli import build_parser
from corral.errors import ConfigError
from corral.server.commands import config_from_args


def config(argv, monkeypatch, **env):
    for key in ("CORRAL_HOST", "CORRAL_API_KEY", "CORRAL_QUANT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_defaults_bind_loopback(monkeypatch):
    c = config([], monkeypatch)
    assert (c.host, c.port, c.parallel, c.max_queue, c.max_loaded, c.keep_alive) == ("127.0.0.1", 11435, 4, 64, 2, 300)
    assert c.loopback and c.api_key is None and c.max_body_bytes == 8 << 20


def test_serve_flags_override_the_environment(monkeypatch):
    c = config(["--host", "0.0.0.0:8080", "--parallel", "2", "--queue", "0", "--max-loaded", "3",
                "--keep-alive", "1h30m", "--api-key", "k", "--model", "a", "--model", "b", "--quant", "int8"],
               monkeypatch, CORRAL_HOST="127.0.0.1:9999", CORRAL_API_KEY="env")
    assert (c.host, c.port, c.parallel, c.max_queue, c.max_loaded) == ("0.0.0.0", 8080, 2, 0, 3)
    assert c.keep_alive == 5400 and c.api_key == "k" and c.preload == ["a", "b"] and c.quant == "int8"
    assert not c.loopback


def test_serve_reads_corral_host_and_key(monkeypatch):
    c = config([], monkeypatch, CORRAL_HOST="[::1]:7000", CORRAL_API_KEY="sekret", CORRAL_QUANT="int4")
    assert (c.host, c.port, c.api_key, c.quant) == ("::1", 7000, "sekret", "int4") and c.loopback


@pytest.mark.parametrize("argv", [["--parallel", "0"], ["--keep-alive", "soon"], ["--max-loaded", "0"]])
def test_serve_bad_values_are_config_errors(monkeypatch, argv):
    with pytest.raises(ConfigError):
        config(argv, monkeypatch)


@pytest.mark.slow  # two `corral serve` process starts
def test_serve_on_port_0_reports_the_port_it_bound(tmp_path):
    """Issue 14 item 22: `--port 0` binds a free port and says which (stdout line and --port-file), so tests
    never guess a "free" port that another process takes first; a taken port is a one-line error."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    env = {**os.environ, "CORRAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("CORRAL_HOST", None)
    env.pop("CORRAL_API_KEY", None)
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "corral", "serve", "--port", "0", "--port-file", str(port_file), "--log-level",
           "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(port_file.read_text())
        assert line.strip() == f"corral serve: listening on http://127.0.0.1:{port}" and port > 0
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as res:
                    assert res.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        taken = subprocess.run([*cmd[:4], "--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and taken.stderr.startswith("corral: error: cannot listen on 127.0.0.1:")
        assert len(taken.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(30)
