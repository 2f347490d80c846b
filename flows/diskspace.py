"""Disk space: a run is refused up front when a disk it writes to has too little room left, and a disk
that fills during a run is told in one line, not retried and not buried in tracebacks.

On a full disk a run used to fail in thousands of lines: torch's checkpoint write, then SQLite's
"database or disk is full" from MLflow's store and Prefect's, each with its traceback, the checkpoint
write retried as if the failure were transient, and the cause said nowhere in a line of its own.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.housekeeping import size_of
from cnn_train.flows.settings import default_artifact_root, sqlite_database, state_dir

#: What a run writes at most, roughly: the data cache on the first full-size run (~55 MB), a checkpoint,
#: the logged model and the report (a few MB each) and the records of MLflow and Prefect. Below this a
#: run would likely fill the disk partway, leaving runs RUNNING and files half written.
MIN_FREE_BYTES = 64 * 2**20
#: The errors a full disk (or a full quota) raises.
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: How SQLite says it (as text: MLflow and SQLAlchemy wrap its error), and how the OS does.
_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded")
_SQLITE_FULL = _FULL_TEXTS[0]
#: How torch.save says a write failed (its C++ stream says no more): "[enforce fail at inline_container.cc:672]
#: . unexpected pos 64 vs 0", raised from "basic_ios::clear: iostream error". A full disk when the state folder's
#: disk, where checkpoints go, has less room than a run needs.
_TORCH_WRITE_FAILED = ("inline_container.cc", "iostream error")


class DiskFullError(ExpectedFailure):
    """A disk a run writes to is full, or too full to start one."""


def run_folders(tracking_uri: str) -> list[Path]:
    """The folders a run writes to: the state folder (checkpoints, caches, spools, a temporary Prefect
    server's database), a SQLite store's folder (its artifacts go beside it) or a file store, and the
    project's artifact folder behind a server on this machine."""
    folders = [state_dir()]
    parsed = urlparse(tracking_uri)
    if (database := sqlite_database(tracking_uri)) is not None:
        folders.append(database.parent)
    elif parsed.scheme in ("", "file"):
        folders.append(Path(parsed.path or tracking_uri))
    elif parsed.hostname in ("127.0.0.1", "localhost"):
        folders.append(default_artifact_root())
    return folders


def check_free_space(folders: Iterable[Path], *, needed: int = MIN_FREE_BYTES) -> None:
    """Raise :class:`DiskFullError` naming the first disk among ``folders``' that has less than ``needed``
    bytes free (a folder not made yet counts by the nearest one that exists)."""
    for folder, device, free in _disks(folders):
        if free < needed:
            raise DiskFullError(
                f"only {_size(free)} free on the disk holding {folder}; a run writes up to about {_size(needed)} "
                f"there: free some space, then run again{_what_may_go(device)}"
            )


def full_disk_line(folders: Iterable[Path]) -> str | None:
    """After a failure that said nothing of disks (Prefect's 500s when its database's disk filled): the line
    naming the first of ``folders``' disks that is full (under 1 MB free), or None."""
    for folder, device, free in _disks(folders, once_per_disk=False):
        if free < 2**20:
            return f"the disk holding {folder} is full ({_size(free)} free): free some space, then run again{_what_may_go(device)}"
    return None


def _disks(folders: Iterable[Path], *, once_per_disk: bool = True) -> Iterator[tuple[Path, int, int]]:
    """The disks ``folders`` are on (each once, by the first folder on it, when ``once_per_disk``): the folder,
    the disk's device and its free bytes. A folder not made yet counts by the nearest one that exists; an
    unreadable one is skipped (the checks of permissions say so in their own words)."""
    seen: set[int] = set()
    for folder in folders:
        existing = _nearest_existing(Path(folder).expanduser())
        if existing is None:
            continue
        try:
            device = os.stat(existing).st_dev
            if once_per_disk and device in seen:
                continue
            free = shutil.disk_usage(existing).free
        except OSError:
            continue
        seen.add(device)
        yield folder, device, free


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or during, says a disk is full."""
    for found in _chain(error):
        if isinstance(found, DiskFullError) or (isinstance(found, OSError) and found.errno in _FULL):
            return True
        if any(text in str(found).lower() for text in _FULL_TEXTS):
            return True
        if _torch_write_failed(found):
            return _free_bytes(state_dir()) < MIN_FREE_BYTES
    return False


def _torch_write_failed(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _TORCH_WRITE_FAILED)


def disk_full_line(error: BaseException) -> str:
    """The one line a run that met a full disk ends with, naming the file when the error does."""
    if isinstance(error, DiskFullError):
        return str(error)
    chain = list(_chain(error))
    where = next((named for found in chain if isinstance(found, OSError) and (named := found.filename2 or found.filename)), None)
    if where:
        place = f"writing {where}"
    elif any(_torch_write_failed(found) for found in chain):
        place = f"writing a checkpoint in {state_dir() / 'checkpoints'}"
    elif any(_SQLITE_FULL in str(found).lower() for found in chain):
        from cnn_train.flows.tracking import tracking_uri  # the store: the one SQLite database a run writes to

        place = f"writing to the store {tracking_uri()}"
    else:
        place = "writing its records"
    return (
        f"a disk this run writes to is full ({place}): free some space, then run again; `cnn-train doctor --fix` "
        "ends what the run could not record as ended"
    )


def store_disk_full(tracking_uri: str) -> bool:
    """Whether a SQLite store's disk is full (under 1 MB free): records that wait for it wait for room, not
    for a server to answer."""
    database = sqlite_database(tracking_uri)
    return database is not None and _free_bytes(database.parent) < 2**20


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then the errors it was raised from or during, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _what_may_go(device: int) -> str:
    """What of the project's own may go, on that disk: old checkpoints and logs (`cnn-train gc`), and the
    data cache, which the next run rebuilds (most of the 64 MB a first full-size run writes)."""
    state = state_dir()
    if not os.path.exists(state) or os.stat(state).st_dev != device:
        return ""
    cache = state / "cache"
    cached = size_of(cache)
    return "; `cnn-train gc` prunes old checkpoints and logs" + (
        f", and the data cache {cache} ({_size(cached)}) may be deleted: runs rebuild it" if cached else ""
    )


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(_nearest_existing(folder) or folder).free
    except OSError:
        return MIN_FREE_BYTES  # unknown: not taken for full


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if os.path.exists(candidate):  # os.path: Path.exists raises under a folder this user cannot enter
            return candidate
    return None


def _size(count: int) -> str:
    return f"{count / 2**20:,.0f} MB" if count >= 2**20 else f"{count / 2**10:,.0f} KB"
