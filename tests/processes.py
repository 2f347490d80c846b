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
    alive = _group_members(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else "(no log)"
    warnings.warn(f"{process.args!r} did not stop within {grace:.0f} s of {signal.Signals(sig).name}; killed. "
                  f"Still running in its group then: {alive}. Its log ends:\n{tail}", stacklevel=2)


def _group_members(pgid: int) -> list[str]:
    """``pid status: command line`` of each process in group ``pgid``: what held the group up."""
    import psutil

    members = []
    for member in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(member.pid) == pgid:
                members.append(f"{member.pid} {member.info['status']}: {' '.join(member.info['cmdline'] or [])[:200]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def signal_masks(pid: int) -> dict[str, int]:
    """Process ``pid``'s blocked, ignored and caught signals (SigBlk, SigIgn, SigCgt of /proc/PID/status)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1], 16) for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt"))}
