"""`corral codeshield FILE|-`: findings printed, exit 1 insecure / 0 clean / 2 error, --json lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import pytest

from corral.cli import main


def test_insecure_file_exits_1_and_prints_line_rule_cwe(tmp_path, capsys):
    f = tmp_path / "app.py"
    f.write_text("import os\n\nos.system('ping ' + host)\n")
    assert main(["codeshield", str(f)]) == 1
    out = capsys.readouterr().out
    assert f"{f}:3: error: python-os-command (CWE-78)" in out


def test_clean_file_exits_0(tmp_path, capsys):
    f = tmp_path / "ok.c"
    f.write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
    assert main(["codeshield", str(f)]) == 0
    assert capsys.readouterr().out == ""


def test_json_lines_from_stdin_with_language(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"char b[8];\ngets(b);\n")))
    assert main(["codeshield", "-", "--language", "c", "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"file": "-", "line": 2, "rule": "c-gets", "cwe": "CWE-242", "severity": "error",
                     "message": rows[0]["message"], "language": "c"}]


def test_language_from_extension(tmp_path, capsys):
    f = tmp_path / "x.php"
    f.write_text("<?php\n$o = unserialize($_GET['s']);\n")
    assert main(["codeshield", str(f), "--json"]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[0])["language"] == "php"


def test_markdown_reply_scans_fenced_blocks(tmp_path, capsys):
    f = tmp_path / "reply.md"
    f.write_text("Try this:\n\n```js\nel.innerHTML = userText;\n```\n")
    assert main(["codeshield", str(f)]) == 1
    assert ":4: warning: js-inner-html" in capsys.readouterr().out


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    binary = tmp_path / "blob.c"
    binary.write_bytes(bytes(range(256)) * 64)
    assert main(["codeshield", str(binary)]) == 2
    assert main(["codeshield", str(tmp_path / "missing.py")]) == 2
    assert main(["codeshield", str(binary), "--language", "cobol"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("corral codeshield: error:") for line in err)
    assert "binary" in err[0] and "missing.py" in err[1] and "cobol" in err[2]


def test_command_line_exit_status_end_to_end(tmp_path):
    f = tmp_path / "a.rs"
    f.write_text("let c = Client::builder().danger_accept_invalid_certs(true).build();\n")
    run = subprocess.run([sys.executable, "-m", "corral", "codeshield", str(f)], capture_output=True, text=True)
    assert run.returncode == 1 and "rust-tls-accept-invalid" in run.stdout and "CWE-295" in run.stdout


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["codeshield"])
    assert info.value.code == 2
