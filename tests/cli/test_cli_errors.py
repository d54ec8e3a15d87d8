"""Issue 14 item 13: inputs that gave a traceback or a misleading message now give one line naming the
problem (`corral: error: ...`, exit 1), and nothing is stored."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main
from corral.store import Store

ROOT = Path(__file__).parents[2]


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("corral: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_modelfile_with_a_non_utf8_byte_names_the_line(tmp_path, home, models, capsys):
    """Item 13: a Latin-1 byte in a Modelfile was a UnicodeDecodeError traceback."""
    modelfile = tmp_path / "Modelfile"
    modelfile.write_bytes(f"FROM {models['gguf']}\nSYSTEM caf\xe9\n".encode("latin-1"))
    err = one_line_error(capsys, "create", "x", "-f", str(modelfile))
    assert "not UTF-8" in err and "line 2" in err and "0xe9" in err and str(modelfile) in err
    assert Store(home).entries() == []


@pytest.mark.parametrize("special", ["device", "fifo"])
def test_from_a_device_or_fifo_says_it_is_not_a_file(tmp_path, home, capsys, special):
    """Item 13: FROM /dev/zero or a fifo said "Not a directory" (and a fifo could block forever)."""
    source = Path("/dev/zero")
    if special == "fifo":
        source = tmp_path / "pipe"
        os.mkfifo(source)
    (tmp_path / "Modelfile").write_text(f"FROM {source}\n")
    err = one_line_error(capsys, "create", "x", "-f", str(tmp_path / "Modelfile"))
    assert f"{source}: not a regular file or directory" in err
    err = one_line_error(capsys, "import", str(source), "y")
    assert "not a regular file or directory" in err
    assert Store(home).entries() == []


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_import_of_proc_self_says_it_holds_no_model(home, capsys):
    """Item 13: `corral import /proc/self` said "Invalid argument" (reading /proc/self/mem)."""
    err = one_line_error(capsys, "import", "/proc/self", "proc")
    assert ": holds no model: no GGUF file" in err and "/proc/" in err


@pytest.mark.parametrize("header", [b"", b"not json at all", b"\xff\xfe{"], ids=["empty", "text", "binary"])
def test_bad_safetensors_header_names_the_file(tmp_path, home, models, capsys, header):
    """Item 13: an empty or non-JSON safetensors header said "directory holds no GGUF file"."""
    hf = tmp_path / "hf"
    shutil.copytree(models["hf"], hf)
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    err = one_line_error(capsys, "import", str(hf), "broken")
    assert "model.safetensors: bad safetensors header" in err and "GGUF" not in err
    assert one_line_error(capsys, "generate", str(hf), "hi").count("bad safetensors header") == 1


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")
@pytest.mark.parametrize("where", ["store", "output"])
def test_quantize_on_a_full_disk_says_no_space_and_removes_its_scratch(tmp_path, models, where):
    """Item 13 / RELIABILITY 44: a store (or -o file) on a full 64 KB tmpfs said "940032 requested and 690624
    written"; now "no space left", exit 1, and no scratch folder or temp file is left on that disk."""
    small = tmp_path / "small"
    small.mkdir()
    home = small if where == "store" else tmp_path / "home"
    argv = [sys.executable, "-m", "corral", "quantize", str(models["gguf"]), "--type", "Q8_0"]
    argv += ["--name", "tiny:q8"] if where == "store" else ["-o", str(small / "out.gguf")]
    script = ('mount -t tmpfs -o size=64k tmpfs "$0" || exit 99; "$@"; rc=$?; '
              'echo "left: $(find "$0" -mindepth 1 ! -name .lock ! -path "$0/models" | tr "\\n" " ")" >&2; exit $rc')
    env = {**os.environ, "CORRAL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(small), *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[0].startswith("corral: error: no space left on the device while writing"), proc.stderr
    assert lines[1].strip() == "left:", proc.stderr  # no .quantize-* folder, no temp file
    assert len(lines) == 2
