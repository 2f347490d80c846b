"""A run's tracking records, kept on local disk until MLflow has them.

Training never waits on the tracking server: params, tags, metrics, datasets, artifacts, spooled models,
registrations and the run's end are appended to a per-run SQLite file under ``<state>/spool/`` (a few
ms), and a courier thread delivers them in order, for any length of outage. A record is removed only
after MLflow accepted it, and delivering one again is harmless (MLflow drops a metric with the same
key, step, timestamp and value; params, tags, artifacts and the end status are overwritten with the
same values). Records left when a run ends are delivered by ``cnn-train sync`` (or ``doctor --fix``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from cnn_train.flows.settings import state_dir
from cnn_train.flows.tracking import registry
from cnn_train.flows.tracking.uri import TrackingUnavailableError, check_reachable

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metric_steps (key TEXT NOT NULL, step INTEGER NOT NULL, PRIMARY KEY (key, step));
"""


def spool_root() -> Path:
    return state_dir() / "spool"


@dataclass(frozen=True)
class Delivery:
    """What one delivery pass did: records delivered, records still waiting, records MLflow refused."""

    delivered: int
    remaining: int
    refused: int = 0


class Spool:
    """The undelivered tracking records of one MLflow run, oldest first."""

    def __init__(self, run_id: str, *, uri: str | None = None, root: Path | None = None) -> None:
        self.run_id = run_id
        self.folder = (root or spool_root()) / run_id
        self._uri = uri
        if uri is not None or self.path.exists():
            self._create()

    def _create(self) -> None:
        """The folder and its tables (again, when a delivered spool was removed and the run logs more)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            connection.executescript(_SCHEMA)  # commits on its own
        finally:
            connection.close()
        if self._uri is not None:  # the writer: it says where the records go and who writes them
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('uri', ?)", (self._uri,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('owner', ?)", (_this_process(),))

    @property
    def path(self) -> Path:
        return self.folder / "records.sqlite"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: used from the training thread, the courier and
        # other processes alike; SQLite serialises the writers. mode=rw: a removed spool is never
        # brought back empty by a late reader.
        connection = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            # An interruption (a Ctrl-C, a trial stopped with its flow) can land before BEGIN or after COMMIT.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    @property
    def uri(self) -> str:
        with self._db() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'uri'").fetchone() or (self._uri,)
        if row[0] is None:
            raise ValueError(f"spool {self.folder} does not say which tracking store it belongs to")
        return row[0]

    def append(self, kind: str, payload: dict[str, Any], *, files: Path | None = None) -> int:
        """Keep one record (and a copy of ``files``, a file or a folder, for artifacts); returns its sequence number."""
        if not self.path.exists():
            self._create()
        with self._db() as db:
            seq = db.execute("INSERT INTO records (kind, payload) VALUES (?, ?)", (kind, json.dumps(payload))).lastrowid
            for key, _, _, step, *_ in payload.get("metrics", ()):
                db.execute("INSERT OR IGNORE INTO metric_steps VALUES (?, ?)", (key, step))
            if files is not None:
                # Copied inside the transaction: a record is never visible without its files.
                target = self.folder / "files" / str(seq)
                if files.is_dir():
                    shutil.copytree(files, target)
                else:
                    target.mkdir(parents=True)
                    shutil.copy2(files, target / files.name)
        return int(seq)

    def pending(self) -> list[tuple[int, str, dict[str, Any]]]:
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute("SELECT seq, kind, payload FROM records ORDER BY seq").fetchall()
        return [(seq, kind, json.loads(payload)) for seq, kind, payload in rows]

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def owner_alive(self) -> bool:
        """Whether the process that writes this spool still runs (it may be riding out an outage)."""
        if not self.path.exists():
            return False
        with self._db() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
        if row is None:
            return False
        pid, _, started = row[0].partition(":")
        try:
            return f"{psutil.Process(int(pid)).create_time():.3f}" == started
        except (psutil.Error, ValueError):
            return False

    def holds_end(self) -> bool:
        """Whether the run's end waits here too (its process is done with it; only delivery is left)."""
        if not self.path.exists():
            return False
        with self._db() as db:
            return db.execute("SELECT 1 FROM records WHERE kind = 'end' LIMIT 1").fetchone() is not None

    def holds_model(self) -> bool:
        """Whether this run's model was kept here while MLflow was away (waiting still, or delivered by now)."""
        if not self.path.exists():
            return False
        with self._db() as db:
            query = "SELECT 1 FROM records WHERE kind = 'model' UNION SELECT 1 FROM meta WHERE key = 'model_uri'"
            return db.execute(query).fetchone() is not None

    def metric_steps(self, key: str) -> set[int]:
        """Steps of ``key`` spooled for this run and not yet cleared, delivered or not."""
        if not self.path.exists():
            return set()
        with self._db() as db:
            return {step for (step,) in db.execute("SELECT step FROM metric_steps WHERE key = ?", (key,))}

    def _meta(self, key: str, value: str | None = None) -> str:
        """Set ``key`` to ``value``, or read it ('' when unset)."""
        with self._db() as db:
            if value is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    def _done(self, seq: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM records WHERE seq = ?", (seq,))
        shutil.rmtree(self.folder / "files" / str(seq), ignore_errors=True)

    def deliver(self) -> Delivery:
        """Send what is waiting, oldest first, stopping at the first record the server cannot take now.

        Only one process delivers a spool at a time; another finding it busy delivers nothing.
        """
        if not self.path.exists() or self.count() == 0:  # nothing to send: no need to ask the server
            return Delivery(0, 0)
        lock = FileLock(str(self.folder / "deliver.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return Delivery(0, self.count())
        try:
            uri = self.uri
            check_reachable(uri, timeout=2.0, as_client=False)
            mlflow_client = MlflowClient(tracking_uri=uri)
            delivered = refused = 0
            for seq, kind, payload in self.pending():
                try:
                    if kind == "batch" and (link := payload.pop("spooled_model_dataset", None)):
                        model_id = self._meta("model_uri").removeprefix("models:/") or None  # None: the model was refused
                        payload["metrics"] = [[*metric[:4], model_id, *link] for metric in payload["metrics"]]
                    # After the model it names (a spooled one's URI is known once delivered); delivered twice,
                    # it finds the version it made (register_version registers a model once per name).
                    if kind == "register":
                        registry.register_delivered(payload, payload.get("model_uri") or self._meta("model_uri"), uri)
                    elif model_uri := _send(mlflow_client, self.run_id, kind, payload, self.folder / "files" / str(seq)):
                        self._meta("model_uri", model_uri)
                except MlflowException as error:
                    if not 400 <= error.get_http_status_code() < 500:
                        raise
                    # Refused for good (e.g. a param logged again with another value): waiting will not help.
                    _log.warning("MLflow refused a %s record of run %s: %s", kind, self.run_id, error)
                    refused += 1
                self._done(seq)
                delivered += 1
            return Delivery(delivered, self.count(), refused)
        except (TrackingUnavailableError, MlflowException, OSError) as error:
            _log.debug("spool of run %s not delivered yet: %s", self.run_id, error)
            return Delivery(0, self.count())
        finally:
            lock.release()

    def discard_if_empty(self) -> None:
        """Remove the spool once nothing waits in it (not while a courier is delivering it)."""
        if not self.path.exists():
            return
        lock = FileLock(str(self.folder / "deliver.lock"))
        try:
            lock.acquire(timeout=5)
        except Timeout:
            return
        try:
            if self.count() == 0:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            lock.release()


def _send(mlflow_client: MlflowClient, run_id: str, kind: str, payload: dict[str, Any], files: Path) -> str | None:
    """Deliver one record; a spooled model's ``models:/`` URI once it is logged."""
    if kind == "batch":
        mlflow_client.log_batch(
            run_id,
            # key, value, timestamp, step, then the model id, dataset name and digest when linked (log_metrics)
            metrics=[Metric(*metric) for metric in payload.get("metrics", ())],
            params=[Param(key, value) for key, value in payload.get("params", ())],
            tags=[RunTag(key, value) for key, value in payload.get("tags", ())],
        )
    elif kind == "dataset":
        dataset = Dataset(**payload["dataset"])
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", payload["context"])])
        mlflow_client.log_inputs(run_id, datasets=[entry])
    elif kind == "artifacts":
        mlflow_client.log_artifacts(run_id, str(files), payload.get("artifact_path"))
    elif kind == "model":
        created = {"name": payload["name"], "source_run_id": run_id, "tags": payload.get("tags"), "params": payload.get("params")}
        logged = mlflow_client.create_logged_model(payload["experiment_id"], **created)
        mlflow_client.log_model_artifacts(logged.model_id, str(files))
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=payload.get("step", 0))])
        return f"models:/{logged.model_id}"
    elif kind == "end":
        mlflow_client.set_terminated(run_id, status=payload["status"], end_time=payload["end_time"])
    else:
        raise ValueError(f"unknown spool record kind {kind!r}")
    return None


def waiting_spools(root: Path | None = None, *, left_behind: bool = False) -> list[Spool]:
    """Spools on this machine still holding records; with ``left_behind``, only those whose process is gone
    (a run's records wait in its spool on their way to MLflow while it runs: its own courier delivers them)."""
    folder = root or spool_root()
    if not folder.is_dir():
        return []
    spools = [Spool(path.parent.name, root=folder) for path in sorted(folder.glob("*/records.sqlite"))]
    return [spool for spool in spools if spool.count() and not (left_behind and spool.owner_alive())]


def has_waiting_records(run_id: str, root: Path | None = None) -> bool:
    """Whether this machine holds undelivered records of ``run_id``."""
    path = (root or spool_root()) / run_id / "records.sqlite"
    return path.is_file() and Spool(run_id, root=root).count() > 0


def not_abandoned(run_id: str, root: Path | None = None) -> bool:
    """Whether a run whose heartbeat stopped is nonetheless not abandoned: its end waits in a spool
    here, or the process writing it still runs (through an outage). A SIGKILLed run is neither."""
    if not has_waiting_records(run_id, root):
        return False
    spool = Spool(run_id, root=root)
    return spool.holds_end() or spool.owner_alive()


def _this_process() -> str:
    return f"{os.getpid()}:{psutil.Process().create_time():.3f}"


#: An empty spool untouched this long belongs to a run that ended or was abandoned: removed by :func:`sync`.
EMPTY_SPOOL_SECONDS = 3600.0


def sync(root: Path | None = None) -> list[tuple[Spool, Delivery]]:
    """Deliver the spools on this machine that their processes left behind (a running one delivers its
    own); emptied spools, and empty ones left by runs long gone, are removed."""
    folder = root or spool_root()
    for path in folder.glob("*/records.sqlite") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > EMPTY_SPOOL_SECONDS:
                Spool(path.parent.name, root=folder).discard_if_empty()
    results = []
    for spool in waiting_spools(root, left_behind=True):
        results.append((spool, spool.deliver()))
        spool.discard_if_empty()
    return results
