"""Stopping the processes a test started: the polite signal first, then SIGKILL, so a process that
is slow to shut down on a busy machine never outlives its test (a leftover `serve` would go on
serving cnn-train/default on the session's Prefect server and take the next test's flow runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from pathlib import Path


def stop_group(process: subprocess.Popen, *, sig: int = signal.SIGINT, grace: float = 60.0, log: Path | None = None) -> None:
    """Send ``sig`` to the process's group (it was started with ``start_new_session=True``); after
    ``grace`` seconds, SIGKILL the group and warn, with the end of ``log`` when there is one."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=grace)
        return
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else "(no log)"
    warnings.warn(f"{process.args!r} did not stop within {grace:.0f} s of {signal.Signals(sig).name}; killed. Its log ends:\n{tail}", stacklevel=2)
