"""GPU leases: an OS file lock (``flock``) per CUDA index under the state dir, so concurrent tasks and
flow runs on one machine get different cards. The kernel drops a lock when its holder closes it, raises
or dies, even by SIGKILL, so a crashed holder never blocks the others. A sidecar ``cuda-N.holder``
names the holder for error messages only; the lock is the truth. Only :mod:`placement` uses this."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout


@dataclass
class Lease:
    """One card held by this process until :meth:`release`."""

    index: int
    lock: FileLock
    holder_file: Path

    def release(self) -> None:
        # Remove the sidecar while still holding the lock, so it can never delete the next holder's.
        self.holder_file.unlink(missing_ok=True)
        self.lock.release()


def try_lease(indices: Sequence[int], lease_dir: Path, task: str) -> Lease | None:
    """Lease the first card nobody holds, or return ``None``; never waits."""
    for index in indices:
        lock = FileLock(lease_dir / f"cuda-{index}.lock")
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue
        holder_file = lease_dir / f"cuda-{index}.holder"
        since = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            holder_file.write_text(f"pid={os.getpid()} host={socket.gethostname()} task={task} since={since}\n")
        except BaseException:
            lock.release()
            raise
        return Lease(index, lock, holder_file)
    return None


def holders(indices: Sequence[int], lease_dir: Path) -> str:
    """Who holds each card, from the sidecars, for a message saying why a task waits."""

    def holder(index: int) -> str:
        try:
            text = (lease_dir / f"cuda-{index}.holder").read_text().strip()
        except FileNotFoundError:
            text = ""
        return f"cuda:{index} by {text or 'an unknown holder'}"

    return "; ".join(holder(index) for index in indices)
