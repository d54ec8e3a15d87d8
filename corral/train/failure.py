"""What the pretraining loop does when a step goes wrong (RELIABILITY.md item 34).

- ``LossGuard`` judges each step's loss: NaN/inf, or a spike above ``spike_factor`` x the running
  mean of recent finite losses. The loop then skips the update or rolls back, and records it.
- ``Watchdog`` is a daemon thread: if no step finishes within the timeout it dumps every thread's
  stack (faulthandler) and exits the process non-zero, so ``torchrun --max-restarts`` starts again
  from the last committed checkpoint. A rank stuck in a collective is caught the same way.
- ``FaultInjector`` fires the ``[fault]`` section's crash / NaN / hang once per run directory: a
  marker file remembers that a fault fired, so the restarted run gets past it.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from corral.train.config import FailureConfig, FaultConfig

WATCHDOG_EXIT_CODE = 3


class TrainingDiverged(RuntimeError):
    """The loss stayed bad: nan_policy "raise", or more rollbacks than failure.max_rollbacks."""


class InjectedCrash(RuntimeError):
    """The crash a ``[fault] crash_at_step`` asks for."""


class LossGuard:
    """Keeps a running window of finite losses and says why a loss is not acceptable."""

    def __init__(self, config: FailureConfig, history: list[float] | None = None):
        self.config = config
        self.window: deque[float] = deque(history or [], maxlen=config.spike_window)

    def verdict(self, loss: float) -> str | None:
        """None when the loss is fine, else "nan" or "spike"."""
        if not math.isfinite(loss):
            return "nan"
        factor = self.config.spike_factor
        if factor > 0 and len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            if loss > factor * mean:
                return "spike"
        return None

    def accept(self, loss: float) -> None:
        self.window.append(loss)

    def history(self) -> list[float]:
        return list(self.window)


class Watchdog:
    """Exit with WATCHDOG_EXIT_CODE after dumping all stacks when ``beat`` is not called in time."""

    def __init__(self, timeout_s: float, dump_path: Path | None = None):
        self.timeout_s = timeout_s
        self.dump_path = dump_path
        self.last_beat = time.monotonic()
        self.label = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="corral-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, label: str) -> None:
        self.last_beat, self.label = time.monotonic(), label

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            if time.monotonic() - self.last_beat > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        message = (f"corral watchdog: no progress for {self.timeout_s:.0f} s after {self.label} "
                   f"(pid {os.getpid()}); dumping all stacks and exiting with code {WATCHDOG_EXIT_CODE}\n")
        sys.stderr.write(message)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.dump_path is not None:
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_path, "a", encoding="utf-8") as f:
                f.write(message)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT_CODE)  # a hung main thread cannot be asked to exit politely


class FaultInjector:
    """Fires each configured fault at its step, once per run directory and rank."""

    def __init__(self, config: FaultConfig, run_dir: Path, rank: int = 0):
        self.config, self.run_dir, self.rank = config, run_dir, rank

    def _once(self, kind: str, step: int) -> bool:
        """True the first time this fault reaches its step in this run directory."""
        marker = self.run_dir / f"fault_{kind}_{step}.rank{self.rank}.fired"  # per rank: no race between ranks
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.flush()
            os.fsync(f.fileno())  # must survive the crash it announces
        return True

    def before_step(self, step: int) -> None:
        """Crash or hang inside step ``step`` when configured."""
        if step == self.config.crash_at_step and self._once("crash", step):
            raise InjectedCrash(f"injected crash at step {step} ([fault] crash_at_step)")
        if step == self.config.hang_at_step and self._once("hang", step):
            sys.stderr.write(f"corral: injected hang at step {step} ([fault] hang_at_step)\n")
            while True:
                time.sleep(3600)

    def nan_now(self, step: int) -> bool:
        return step == self.config.nan_at_step and self._once("nan", step)

    def before_commit(self, step: int):
        """A hook for save_checkpoint that SIGKILLs this process between writing and committing."""
        if step != self.config.kill_in_save_at_step or not self._once("kill_in_save", step):
            return None

        def kill(path: Path) -> None:
            sys.stderr.write(f"corral: injected SIGKILL during the save of {path}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return kill
