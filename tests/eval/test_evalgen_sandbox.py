"""The code sandbox contains hostile programs (RELIABILITY.md item 48) and scores them as failures.

Every escape attempt runs twice where the machine allows it: with every layer (what HumanEval
uses) and with the Python audit hook off, so the kernel layers alone ("root" mode: namespaces,
own uid, limits) are shown to hold too.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from corral.eval.sandbox import SandboxLimits, isolation, run_python

FULL = SandboxLimits(timeout_s=3.0)
KERNEL_ONLY = SandboxLimits(timeout_s=3.0, audit=False)
LAYERS = [pytest.param(FULL, id="all-layers"),
          pytest.param(KERNEL_ONLY, id="kernel-only",
                       marks=pytest.mark.skipif(isolation() != "root", reason="kernel isolation needs root here"))]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "sentinel.txt"
    path.write_text("still here")
    return path


def test_clean_program_passes_and_sees_its_own_home():
    result = run_python("import os\nprint(os.environ['HOME'], os.getcwd())\n", FULL)
    assert result.passed, result.stderr
    home, cwd = result.stdout.split()
    assert home.startswith(cwd) and not home.startswith(os.path.expanduser("~"))


def test_failing_assertion_scores_failed():
    result = run_python("assert 1 + 1 == 3\n", FULL)
    assert result.status == "failed" and "AssertionError" in result.stderr


@pytest.mark.parametrize("limits", LAYERS)
def test_infinite_loop_times_out_within_the_wall_clock(limits):
    started = time.perf_counter()
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, audit=limits.audit))
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - started < 6


@pytest.mark.parametrize("limits", LAYERS)
def test_ten_gigabyte_allocation_fails(limits):
    result = run_python("x = bytearray(10 * 2**30)\nprint('allocated')\n", limits)
    assert not result.passed and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("limits", LAYERS)
def test_fork_bomb_is_bounded_and_leaves_no_process(limits):
    bomb = "import os\nprint(os.getsid(0), flush=True)\nwhile True:\n    os.fork()\n"
    result = run_python(bomb, SandboxLimits(timeout_s=2.0, processes=16, audit=limits.audit))
    assert not result.passed
    session = int(result.stdout.split()[0])
    time.sleep(0.2)
    assert session not in _sessions()  # every process the bomb started is gone


@pytest.mark.parametrize("limits", LAYERS)
def test_network_connect_fails(limits):
    program = ("import socket\n"
               "s = socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
               "print('connected')\n")
    result = run_python(program, limits)
    assert not result.passed and "connected" not in result.stdout


@pytest.mark.parametrize("limits", LAYERS)
def test_rm_rf_home_removes_only_the_sandbox_home(limits, sentinel):
    program = ("import os, shutil\n"
               "home = os.path.expanduser('~')\n"
               "os.system('rm -rf ~ ' + repr(str(home)))\n"
               f"shutil.rmtree({str(sentinel.parent)!r})\n"
               "shutil.rmtree(home)\n")
    result = run_python(program, limits)
    assert not result.passed
    assert sentinel.read_text() == "still here"
    assert Path(os.path.expanduser("~")).is_dir() and (REPO / "pyproject.toml").is_file()


@pytest.mark.parametrize("limits", LAYERS)
def test_writes_outside_the_work_folder_do_not_land(limits, sentinel):
    marker = REPO / f"sandbox-escape-{os.getpid()}"
    program = (f"open({str(sentinel)!r}, 'w').write('overwritten')\n"
               f"open({str(marker)!r}, 'w').write('escaped')\n")
    result = run_python(program, limits)
    assert not result.passed
    assert sentinel.read_text() == "still here" and not marker.exists()


@pytest.mark.parametrize("limits", LAYERS)
def test_oversized_file_write_fails(limits):
    result = run_python("open('big.bin', 'wb').write(b'x' * (64 << 20))\n", SandboxLimits(file_bytes=1 << 20,
                                                                                          audit=limits.audit))
    assert not result.passed


@pytest.mark.skipif(isolation() != "root", reason="only root mode gives the program its own uid")
def test_program_cannot_signal_the_test_process():
    program = f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n"
    result = run_python(program, KERNEL_ONLY)
    assert not result.passed and "Operation not permitted" in result.stderr


def test_work_folder_is_removed_afterwards():
    before = set(Path(tempfile.gettempdir()).glob("corral-sandbox-*"))
    result = run_python("open('scratch.txt', 'w').write('x')\n", FULL)
    assert result.passed
    assert set(Path(tempfile.gettempdir()).glob("corral-sandbox-*")) <= before


def _sessions() -> set[int]:
    """Sessions with a live process (zombies are dead: they wait for init to reap them)."""
    out = subprocess.run(["ps", "-e", "-o", "sid=,stat="], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z")}



@pytest.mark.parametrize("mode", ["userns", "none"])
def test_fallback_modes_still_refuse_network_and_outside_writes(mode, sentinel):
    """Without root the audit hook is what stops these (the docstring of sandbox.py says so)."""
    if mode == "userns" and not run_python("pass", FULL, mode="userns").passed:
        pytest.skip("no unprivileged user namespaces here")
    program = ("import socket, shutil\n"
               "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\nexcept OSError:\n    pass\n"
               "else:\n    print('connected')\n"
               f"shutil.rmtree({str(sentinel.parent)!r})\n")
    result = run_python(program, FULL, mode=mode)
    assert not result.passed and "connected" not in result.stdout
    assert sentinel.read_text() == "still here"
