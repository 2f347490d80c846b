"""Experiments and runs: create them, and log params, metrics, tags, datasets and artifacts by run id.

Prefect runs tasks in threads and MLflow's fluent API keeps the active run in thread-local
state, so everything here goes through ``MlflowClient`` with explicit run ids. What a run logs goes
through its spool (:mod:`.spool`): appended on disk at once, delivered by a courier thread, so the
training loop never waits on the tracking server, and an outage of any length loses nothing.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.entities import SourceType
from mlflow.exceptions import MlflowException

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import default_artifact_root, env_number
from cnn_train.flows.diskspace import store_disk_full
from cnn_train.flows.tracking import courier, liveness, models, spool
from cnn_train.flows.tracking.uri import TrackingUnavailableError, check_reachable, run_url, tracking_uri, waiting_on, without_password
from cnn_train.plugins.contract import EpochMetrics, LoggableModel

# No public API or constant for the experiment kind: only the MLflow UI reads this tag (test_tracking guards it).
#: Without it the MLflow UI opens a new experiment in its GenAI view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: What the UI shows as a run's source when the caller does not name one.
DEFAULT_SOURCE_NAME = "cnn-train"
#: Tag a retried child run is found by (see :meth:`RunTracker.reopen_or_start`).
RUN_KEY_TAG = "cnn_train.run_key"
_MAX_PARAM_LENGTH = 6000
#: How long a run's end waits for its spool to reach MLflow before leaving the rest for `cnn-train sync`.
FLUSH_SECONDS = env_number("CNN_TRAIN_SPOOL_FLUSH_SECONDS", 15.0, minimum=0)
#: How long a read through the tracker waits for the tracker's own writes to land first.
_READ_FLUSH_SECONDS = 5.0

_log = logging.getLogger(__name__)


class DeletedExperimentError(ExpectedFailure, RuntimeError):
    """The run's experiment is in MLflow's trash: the message says how to restore it."""


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it with a pinned artifact location for local stores; either way
    it opens in the MLflow UI's model-training view."""
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage == "deleted":
        # Deleted in the UI, the experiment keeps its name, and MLflow refuses every run in it.
        store = without_password(mlflow_client.tracking_uri)
        raise DeletedExperimentError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) is deleted; restore it with "
            f"`MLFLOW_TRACKING_URI={store} mlflow experiments restore --experiment-id {existing.experiment_id}`, "
            "or give the run another experiment name"
        )
    if existing is not None:
        _mark_model_training(mlflow_client, existing)
        return existing.experiment_id
    location = None
    parsed = urlparse(mlflow_client.tracking_uri)
    # Artifacts go in a folder beside the SQLite file, whether the store is reached directly or
    # through the project's own server: otherwise they land relative to whoever created the
    # experiment, or behind an mlflow-artifacts: URI that a direct SQLite client cannot resolve.
    if parsed.scheme == "sqlite":
        location = (Path(parsed.path.removeprefix("/")).resolve().parent / "mlartifacts" / name).as_uri()
    elif parsed.hostname in ("127.0.0.1", "localhost"):
        location = (default_artifact_root() / name).as_uri()
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except MlflowException:
        # Another run created it between our lookup and create.
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        _mark_model_training(mlflow_client, found)
        return found.experiment_id


def _mark_model_training(mlflow_client: MlflowClient, experiment: Any) -> None:
    """Give an experiment that has no kind yet the model-training one; a kind someone chose stays."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def source_tags(source_name: str = DEFAULT_SOURCE_NAME) -> dict[str, str]:
    """The source and user tags MLflow's fluent API would set, which ``MlflowClient.create_run`` leaves out."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, e.g. a container user without a passwd entry
        user = "unknown"
    tags = {
        "mlflow.source.name": source_name,
        "mlflow.source.type": SourceType.to_string(SourceType.LOCAL),
        "mlflow.user": user,
    }
    if commit := code_commit():
        tags["mlflow.source.git.commit"] = commit  # the run page's "Git commit", as the fluent API sets it
    return tags


@functools.cache
def code_commit() -> str | None:
    """The git commit of the cnn-train code this process runs, when it runs from a git checkout (an
    installed wheel has none): which code trained a model, as the Prefect deployment's version says it."""
    try:
        found = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    commit = found.stdout.strip()
    return commit if found.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


#: Runs this process described (their records may still wait in the spool, where MLflow cannot tell).
_DESCRIBED: set[str] = set()


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RunTracker:
    """One MLflow run, addressed by id so it can be used from any thread or process."""

    uri: str
    run_id: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        """A client for reading the run; what this tracker logged is delivered first (briefly waited for),
        so reads see it."""
        self.flush(_READ_FLUSH_SECONDS)
        return MlflowClient(tracking_uri=self.uri)

    @property
    def courier(self) -> courier.Courier:
        return courier.courier_for(self.uri, self.run_id)

    def _spool(self, kind: str, payload: dict[str, Any], *, files: Path | None = None) -> None:
        self.courier.spool.append(kind, payload, files=files)
        self.courier.nudge()

    def flush(self, timeout: float = FLUSH_SECONDS) -> int:
        """Wait up to ``timeout`` seconds for everything logged so far to reach MLflow; returns the
        number of records still waiting on disk."""
        if not spool.has_waiting_records(self.run_id):
            return 0  # nothing waits (a read of a finished run): no spool is made again, nor a courier started
        return self.courier.flush(timeout)

    @classmethod
    def start(
        cls,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        uri: str | None = None,
        source_name: str = DEFAULT_SOURCE_NAME,
    ) -> RunTracker:
        """A new RUNNING run in ``experiment`` (created if needed), tagged with its source and user."""
        uri = uri or tracking_uri()
        check_reachable(uri)
        mlflow_client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_experiment(mlflow_client, experiment)
        all_tags = {**source_tags(source_name), **{k: v for k, v in (tags or {}).items() if v is not None}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id, experiment_id)

    @classmethod
    def reopen_or_start(
        cls,
        experiment: str,
        *,
        key: str,
        parent_run_id: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        uri: str | None = None,
    ) -> RunTracker:
        """The child run of ``parent_run_id`` tagged with ``key`` (letters and digits), RUNNING again, or
        a new one carrying ``key``: a retried training finds its run, and so its checkpoint, instead of
        starting a second run."""
        uri = uri or tracking_uri()
        check_reachable(uri)
        mlflow_client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_experiment(mlflow_client, experiment)
        found = mlflow_client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{RUN_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        if not found:
            tags = {**(tags or {}), RUN_KEY_TAG: key}
            return cls.start(experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id, uri=uri)
        tracker = cls(uri, found[0].info.run_id, experiment_id)
        tracker.flush()  # an earlier attempt's end, if still on its way, lands before the run reopens
        if liveness.REAPED_TAG in found[0].data.tags:
            mlflow_client.delete_tag(tracker.run_id, liveness.REAPED_TAG)
        mlflow_client.update_run(tracker.run_id, status="RUNNING")
        return tracker

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI; None when the store is not behind an MLflow server
        (then :func:`~cnn_train.flows.tracking.open_hint` says how to browse it)."""
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # A value left out (None: the architecture's default, all images, searched for) is no param: MLflow showed 'None'.
        items = [[key, models.param_text(value)[:_MAX_PARAM_LENGTH]] for key, value in params.items() if value is not None]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._spool("batch", {"params": items[start : start + 100]})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags; a None value means there is nothing to say, so that tag is left out."""
        items = [[k, models.param_text(v)[:_MAX_PARAM_LENGTH]] for k, v in tags.items() if v is not None]
        for start in range(0, len(items), 100):
            self._spool("batch", {"tags": items[start : start + 100]})

    def describe(self, markdown: str, *, unless_described: bool = False) -> None:
        """The run's description: the markdown the MLflow UI shows at the top of the run's page;
        ``unless_described`` keeps one this process gave it already."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        if unless_described and self.run_id in _DESCRIBED:
            return
        _DESCRIBED.add(self.run_id)
        self.set_tags({MLFLOW_RUN_NOTE: markdown})

    def log_metrics(
        self, metrics: Mapping[str, float], *, step: int = 0, model_uri: str | None = None,
        dataset: tuple[str, str] | None = None,
    ) -> None:
        """Metrics at ``step``; with a logged model's ``model_uri`` (``models:/m-...``) and a ``dataset`` logged
        with the run (name, digest), they are that model's scores on that dataset: MLflow 3's model page and
        the experiment's model list show them."""
        # The timestamp is fixed here, so a record delivered twice is one metric in MLflow.
        timestamp = _now_ms()
        model_id = models.logged_model_id(model_uri)
        link = [model_id, *(dataset or (None, None))] if model_id else []
        items = [[k, float(v), timestamp, step, *link] for k, v in metrics.items()]
        # No URI yet for a model kept in the spool while MLflow was away: the spool links them on delivery.
        later = {"spooled_model_dataset": list(dataset)} if dataset and not model_id and self._spooled_model() else {}
        for start in range(0, len(items), 1000):
            self._spool("batch", {"metrics": items[start : start + 1000]} | later)

    def _spooled_model(self) -> bool:
        return spool.Spool(self.run_id).holds_model()

    def log_epoch(self, metrics: EpochMetrics, *, prefix: str = "") -> None:
        """One epoch's metrics at step = epoch, the moment the epoch ends."""
        values = {
            "loss": metrics.loss,
            "accuracy": metrics.accuracy,
            "val_loss": metrics.val_loss,
            "val_accuracy": metrics.val_accuracy,
            "epoch_seconds": metrics.seconds,
            "images_per_second": metrics.images_per_second,
        }
        self.log_metrics({prefix + k: v for k, v in values.items()}, step=metrics.epoch)

    def logged_steps(self, key: str) -> list[int]:
        """Steps of ``key`` this run has logged: spooled here (delivered or not), and any MLflow holds."""
        steps = spool.Spool(self.run_id).metric_steps(key)
        try:
            check_reachable(self.uri, timeout=2.0, as_client=False)
            steps |= {m.step for m in MlflowClient(tracking_uri=self.uri).get_metric_history(self.run_id, key)}
        except (TrackingUnavailableError, MlflowException):
            pass  # what was spooled is still known; MLflow gets it later
        return sorted(steps)

    def log_dataset(
        self,
        features: np.ndarray,
        targets: np.ndarray,
        *,
        name: str,
        source: str,
        digest: str,
        context: str,
    ) -> None:
        """Record a dataset with its digest and source (a URL or a local folder) through MLflow's dataset API."""
        dataset = mlflow.data.from_numpy(
            features, targets=targets, source=_dataset_source(source), name=name, digest=digest
        )
        config = dataset.to_dict()
        entity = {key: config.get(key) for key in ("name", "digest", "source_type", "source", "schema", "profile")}
        self._spool("dataset", {"dataset": entity, "context": context})

    def log_model(self, loggable: LoggableModel, record: models.ModelRecord) -> str | None:
        """Log the model into this run as ``record`` describes it (see :func:`cnn_train.flows.tracking.models.log_model`);
        returns its model URI. While the server does not answer, the model is saved into the spool and
        logged when it is back; then there is no URI yet and this returns None."""
        try:
            check_reachable(self.uri, timeout=2.0, as_client=False)
        except TrackingUnavailableError as error:
            _log.warning("%s; the model is kept in the spool of run %s and logged when it answers", error, self.run_id)
            with tempfile.TemporaryDirectory(prefix="cnn-train-model-") as folder:
                saved = Path(folder) / record.name
                models.save_model(saved, loggable, record)
                payload = {
                    "experiment_id": self.experiment_id, "name": record.name, "tags": {"flavor": loggable.flavor},
                    "params": record.param_strings(),
                }
                self._spool("model", payload, files=saved)
            return None
        return models.log_model(self.uri, self.experiment_id, self.run_id, loggable, record)

    def register_later(self, name: str, facts: Mapping[str, Any], description: str, *, model_uri: str | None, record_on: str) -> None:
        """Register this run's model as ``name`` once MLflow has the run's records (its spooled model first,
        when ``model_uri`` is None); the registration's tags go on run ``record_on``."""
        request = {"name": name, "facts": dict(facts), "description": description, "model_uri": model_uri, "record_on": record_on}
        self._spool("register", request)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log one file; it is copied into the spool at once, so the caller may delete it."""
        self._spool("artifacts", {"artifact_path": artifact_path}, files=path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Log a folder's files; they are copied into the spool at once, so the caller may delete them."""
        self._spool("artifacts", {"artifact_path": artifact_path}, files=directory)

    def finish(self, status: str = "FINISHED", *, flush_timeout: float = FLUSH_SECONDS) -> int:
        """End the run as FINISHED, FAILED or KILLED, after everything it logged; returns the number of
        records still waiting on disk when the server did not answer within ``flush_timeout``
        (:func:`waiting_message` says what to do; `cnn-train sync` delivers them and this status)."""
        self._spool("end", {"status": status, "end_time": _now_ms()})
        left = self.flush(flush_timeout)
        if left == 0:
            spool.Spool(self.run_id).discard_if_empty()
        return left

    def waiting_message(self) -> str:
        """One line: what is kept, where, and how it reaches MLflow."""
        waiting = spool.Spool(self.run_id)
        full = store_disk_full(self.uri)
        why = f"the store {self.uri} is on a full disk" if full else f"{waiting_on(self.uri)} did not answer"
        return (
            f"{why}: {waiting.count()} tracking record(s) of run {self.run_id} are kept in {waiting.folder}; run "
            f"`cnn-train sync` once {'its disk has room' if full else 'it answers'} to deliver them and the run's final status"
        )

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    @contextlib.contextmanager
    def heartbeat(self, interval: float | None = None) -> Iterator[None]:
        """Stamp the run while the block runs (see :func:`cnn_train.flows.tracking.liveness.heartbeat`)."""
        with liveness.heartbeat(self.uri, self.run_id, interval):
            yield


def _dataset_source(source: str) -> Any:
    """The one DatasetSource that ``source`` means.

    Given a bare string, MLflow asks every registered source type whether it can read it, and a local
    path matches two (the ``""`` and ``file`` schemes both register a LocalArtifactDatasetSource),
    which warns on every run; naming the type removes the guess.
    """
    if urlparse(source).scheme in ("http", "https"):
        return HTTPDatasetSource(source)
    from mlflow.data.sources import LocalArtifactDatasetSource

    return LocalArtifactDatasetSource(source)
