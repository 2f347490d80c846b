"""What the project's state holds on disk, and pruning what piles up (`cnn-train status`, `cnn-train gc`).

Bounded elsewhere: report files live in a temporary folder until MLflow holds them; a FINISHED run's
checkpoint is dropped when it ends; the data cache keeps a few splits. What is left to prune by age:
checkpoints of FAILED or KILLED runs (kept so a retry can resume), the temporary Prefect server's
results and database (runs without servers), logs of servers that are not running, stale pid and port files.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cnn_train.flows.settings import default_artifact_root, project_root, state_dir, temporary_prefect_home

#: `7d`, `12h`, `1d12h`, `30m`, `90s`, `2w`: the spelling `cnn-train gc --older-than` takes.
_DURATION = re.compile(r"(\d+)([wdhms])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
#: A checkpoint folder is named after its MLflow run id.
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class DurationError(ValueError):
    """A duration that is not NUMBER+UNIT pieces."""


def parse_duration(text: str) -> timedelta:
    """``"7d"`` as 7 days; pieces add up (``"1d12h"``); units w, d, h, m, s."""
    compact = text.strip().lower()
    pieces = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in pieces) != compact:
        raise DurationError(f"a duration is NUMBER+UNIT pieces with units w, d, h, m, s (7d, 12h, 1d12h); got {text!r}")
    try:
        return sum((timedelta(**{_UNITS[unit]: int(number)}) for number, unit in pieces), timedelta())
    except OverflowError:
        raise DurationError(f"a duration is at most {timedelta.max.days} days; got {text!r}") from None


def _files_under(path: Path) -> Iterator[os.stat_result]:
    """The stat of ``path`` and of every file and folder under it, links not followed; what vanishes
    meanwhile (a spool record delivered, a cache entry replaced) is left out."""
    for entry in (path, *(Path(folder, name) for folder, dirs, files in os.walk(path) for name in (*dirs, *files))):
        try:
            yield entry.lstat()
        except FileNotFoundError:
            continue


def size_of(path: Path) -> int:
    """Bytes in a file, or in every file under a folder (links not followed); 0 when missing."""
    return sum(info.st_size for info in _files_under(path) if stat.S_ISREG(info.st_mode))


def last_written(path: Path) -> float:
    """The newest modification time of a file, or of a folder and anything under it (0 when missing)."""
    return max((info.st_mtime for info in _files_under(path)), default=0.0)


def human_size(size: int) -> str:
    """``1536`` as ``1.5 KB``: binary steps, one decimal above bytes."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@dataclass(frozen=True)
class Usage:
    """One place the project keeps state, and its size."""

    label: str
    size: int


def _label(path: Path) -> str:
    """``.state/cache/`` for a folder in the project (a file has no slash), the absolute path elsewhere."""
    try:
        shown = path.relative_to(project_root())
    except ValueError:
        shown = path
    return f"{shown}/" if path.is_dir() else str(shown)


def _sqlite_files(database: Path) -> list[Path]:
    """A SQLite database with its write-ahead log and shared-memory files."""
    return [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]


def disk_usage() -> list[Usage]:
    """The MLflow store, its artifacts, and everything directly under the state directory."""
    store = sum(size_of(path) for path in _sqlite_files(project_root() / "mlflow.db"))
    artifacts = default_artifact_root()
    places = [Usage("mlflow.db", store), Usage(f"{_label(artifacts).rstrip('/')}/", size_of(artifacts))]
    places += [Usage(_label(path), size_of(path)) for path in sorted(state_dir().iterdir())]
    return places


@dataclass(frozen=True)
class Removal:
    """Something `cnn-train gc` removes, and why."""

    path: Path
    size: int
    reason: str


def _age(seconds: float) -> str:
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h" if days else f"{hours} h"


def _checkpoints(older_than: timedelta, run_status: Callable[[str], str | None], now: float) -> Iterator[Removal]:
    folder = state_dir() / "checkpoints"
    for checkpoint in sorted(folder.iterdir()) if folder.is_dir() else ():
        status = run_status(checkpoint.name)
        idle = now - last_written(checkpoint)
        if status == "FINISHED":
            yield Removal(checkpoint, size_of(checkpoint), "checkpoint of a FINISHED run (its model is in MLflow)")
        elif status == "RUNNING":  # training, or abandoned until `doctor --fix` marks it FAILED: kept either way
            continue
        elif idle > older_than.total_seconds():
            yield Removal(checkpoint, size_of(checkpoint), f"checkpoint of {'a ' + status if status else 'an unknown'} run, untouched for {_age(idle)}")


def _temporary_prefect(older_than: timedelta, now: float) -> Iterator[Removal]:
    """Results and the database of the temporary Prefect server (runs without servers). The database
    goes only when nothing wrote to it for the whole age: no run is using it, the next one recreates it."""
    home = temporary_prefect_home()
    storage = home / "storage"
    for result in sorted(storage.iterdir()) if storage.is_dir() else ():
        if now - last_written(result) > older_than.total_seconds():
            yield Removal(result, size_of(result), "a temporary flow run's stored result")
    database = [path for path in _sqlite_files(home / "prefect.db") if path.exists()]
    if database and now - max(last_written(path) for path in database) > older_than.total_seconds():
        for path in database:
            yield Removal(path, size_of(path), "the temporary Prefect server's database, unused (recreated when needed)")


def _server_files(older_than: timedelta, running: Iterable[str], now: float) -> Iterator[Removal]:
    """Logs of servers that are not running and were not written for the whole age; pid and port files of dead processes."""
    running = set(running)
    logs = state_dir() / "logs"
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else ():
        if log.stem not in running and now - last_written(log) > older_than.total_seconds():
            yield Removal(log, size_of(log), "log of a server that is not running")
    records = state_dir() / "run"
    for pattern, what in (("*.pid", "pid file of a process that is gone"), ("*.port", "port of a server that is gone")):
        for record in sorted(records.glob(pattern)) if records.is_dir() else ():
            if record.stem not in running:
                yield Removal(record, size_of(record), what)


def run_statuses(run_ids: Iterable[str], uri: str) -> dict[str, str]:
    """The MLflow status of each run the store at ``uri`` knows (unknown ids are left out)."""
    from cnn_train.flows import tracking

    wanted = sorted({run_id for run_id in run_ids if _RUN_ID.fullmatch(run_id)})
    mlflow_client = tracking.client(uri)
    experiments = [experiment.experiment_id for experiment in mlflow_client.search_experiments()]
    if not wanted or not experiments:
        return {}
    listed = ", ".join(f"'{run_id}'" for run_id in wanted)
    runs = mlflow_client.search_runs(experiments, filter_string=f"attributes.run_id IN ({listed})", max_results=len(wanted))
    return {run.info.run_id: run.info.status for run in runs}


def checkpointed_runs() -> list[str]:
    """Run ids with a checkpoint folder."""
    folder = state_dir() / "checkpoints"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def plan_gc(
    older_than: timedelta,
    *,
    run_status: Callable[[str], str | None],
    running_services: Iterable[str],
    now: float | None = None,
) -> list[Removal]:
    """What `cnn-train gc` removes: ``run_status(run_id)`` is the MLflow run's status, or None when unknown."""
    now = time.time() if now is None else now
    return [
        *_checkpoints(older_than, run_status, now),
        *_temporary_prefect(older_than, now),
        *_server_files(older_than, running_services, now),
    ]


def remove(removals: Iterable[Removal]) -> None:
    for removal in removals:
        if removal.path.is_dir():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            removal.path.unlink(missing_ok=True)
