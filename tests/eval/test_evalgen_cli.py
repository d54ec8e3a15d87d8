"""`corral eval` options of the generation tasks: bad values are one clear line, never a traceback."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_samples_below_one_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "corral", "eval", "--tasks", "humaneval", "--samples", "0"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "--samples must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_help_explains_samples_and_chat():
    proc = subprocess.run([sys.executable, "-m", "corral", "eval", "run", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "--samples" in proc.stdout and "pass@k" in proc.stdout
