"""Everything cnn-train says to MLflow goes through this module, with explicit run ids.

Prefect runs tasks in threads and MLflow's fluent API keeps the active run in thread-local
state, so this module uses ``MlflowClient`` and passes run ids around instead.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import numpy as np

from cnn_train.flows.settings import default_artifact_root, default_tracking_uri
from cnn_train.plugins.contract import EpochMetrics, LoggableModel

# MLflow ignores DO_NOT_TRACK=1 (it wants "true"); nothing here may reach for the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402

# Tag linking an MLflow run to the Prefect flow run that produced it.
FLOW_RUN_TAG = "prefect.flow_run_id"
HEARTBEAT_TAG = "cnn_train.heartbeat"
REAPED_TAG = "cnn_train.reaped"
HEARTBEAT_SECONDS = float(os.environ.get("CNN_TRAIN_HEARTBEAT_SECONDS", "20"))
#: A RUNNING run whose last heartbeat is older than this was abandoned (its process was killed).
STALE_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS

_log = logging.getLogger(__name__)
# PyTorch's exporter (MLflow's default pt2 format) keeps its tracing mode in process-global state,
# and Model.log reads the process-wide tracking URI: two threads logging models at once (sweep
# trials) would break each other.
_LOG_MODEL_LOCK = threading.Lock()
_MAX_PARAM_LENGTH = 6000


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's MLflow server when ``cnn-train up`` runs it,
    else the project's ``mlflow.db``."""
    from cnn_train.flows.services import project_mlflow_server

    return os.environ.get("MLFLOW_TRACKING_URI") or project_mlflow_server() or default_tracking_uri()


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, with what to do about it, when an HTTP tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310 - user-configured URI
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} is not reachable ({problem}); start it with `cnn-train up`, "
        "or unset MLFLOW_TRACKING_URI to log to the project's mlflow.db"
    )


def ui_base_url(uri: str) -> str | None:
    """The web UI serving ``uri``, when it is a server."""
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else None


def artifact_url(uri: str, run_id: str, path: str) -> str | None:
    """A browser URL serving one artifact of a run, when the store is an MLflow server."""
    base = ui_base_url(uri)
    if base is None:
        return None
    return f"{base}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    base = ui_base_url(uri)
    if base is None:
        return f"{uri} (experiment {experiment_id}, run {run_id}; browse with `mlflow ui --backend-store-uri {uri}`)"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it with a pinned artifact location for local stores."""
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
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
        return mlflow_client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another run created it between our lookup and create.
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _stringify(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return text[:_MAX_PARAM_LENGTH]


@dataclass(frozen=True)
class RunTracker:
    """One MLflow run, addressed by id so it can be used from any thread or process."""

    uri: str
    run_id: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    @classmethod
    def start(
        cls,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        uri: str | None = None,
    ) -> RunTracker:
        uri = uri or tracking_uri()
        check_reachable(uri)
        mlflow_client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_experiment(mlflow_client, experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id, experiment_id)

    @property
    def url(self) -> str:
        return run_url(self.uri, self.experiment_id, self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, _stringify(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, _stringify(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        timestamp = _now_ms()
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        )

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
        return sorted(m.step for m in self.client.get_metric_history(self.run_id, key))

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
        """Record a dataset with its digest and source through MLflow's dataset API."""
        dataset = mlflow.data.from_numpy(features, targets=targets, source=source, name=name, digest=digest)
        entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[entry])

    def log_model(
        self,
        loggable: LoggableModel,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        input_example: np.ndarray | None = None,
        name: str = "model",
    ) -> str:
        """Log the model in its native flavor with a tensor signature; returns its model URI."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        flavor = importlib.import_module(f"mlflow.{loggable.flavor}")
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
        )
        with _LOG_MODEL_LOCK, _process_tracking_uri(self.uri):
            return self._log_model_locked(flavor, loggable, signature, input_example, name)

    def _log_model_locked(
        self, flavor: Any, loggable: LoggableModel, signature: Any, input_example: np.ndarray | None, name: str
    ) -> str:
        from mlflow.models import Model

        # Each flavor names its model argument differently (pytorch_model, model, sk_model...).
        model_argument = next(iter(inspect.signature(flavor.save_model).parameters))
        # Model.log would file the model under the thread's active experiment (often the default
        # one), where `runs:/<run id>/model` cannot find it; create it in the run's experiment.
        logged = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id, tags={"flavor": loggable.flavor}
        )
        info = Model.log(
            artifact_path=None,
            name=name,
            model_id=logged.model_id,
            flavor=flavor,
            run_id=self.run_id,
            signature=signature,
            pip_requirements=list(loggable.pip_requirements) or None,
            input_example=input_example if loggable.accepts_input_example else None,
            **{model_argument: loggable.model},
            **loggable.extra,
        )
        return info.model_uri

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    @contextlib.contextmanager
    def heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """Stamp the run every ``interval`` seconds while the block runs, so a run whose process was
        SIGKILLed (and so could not mark itself) is recognisable as stale and can be reaped."""
        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    self.set_tags({HEARTBEAT_TAG: f"{time.time():.0f}"})
                except Exception:  # noqa: BLE001 - a missed beat must not break training
                    _log.debug("heartbeat for run %s failed", self.run_id, exc_info=True)
                if stop.wait(interval):
                    return

        thread = threading.Thread(target=beat, name=f"mlflow-heartbeat-{self.run_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for a block (Model.log reads only that).

    MLflow's own helper for this restores the URI but also rewrites or unsets the
    MLFLOW_TRACKING_URI environment variable, which this process and its children rely on, so the
    variable is put back as it was.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def _now_ms() -> int:
    return int(time.time() * 1000)


def find_runs_for_flow_run(flow_run_id: str, *, uri: str | None = None) -> list[Any]:
    """MLflow runs tagged with the Prefect flow run id, across experiments."""
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return []
    return mlflow_client.search_runs(experiments, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")


def mark_unfinished(run_id: str, status: str, *, uri: str | None = None) -> bool:
    """Mark a run FAILED or KILLED unless it already ended; returns whether it changed."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
        return False
    mlflow_client.set_terminated(run_id, status=status)
    return True


def stale_runs(*, uri: str | None = None, stale_after: float = STALE_AFTER_SECONDS) -> list[Any]:
    """RUNNING runs written by cnn-train whose heartbeat stopped more than ``stale_after`` seconds ago."""
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return []
    now = time.time()
    running = mlflow_client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return [
        run
        for run in running
        if HEARTBEAT_TAG in run.data.tags and now - float(run.data.tags[HEARTBEAT_TAG]) > stale_after
    ]


def reap_stale_runs(*, uri: str | None = None, stale_after: float = STALE_AFTER_SECONDS) -> list[str]:
    """Mark abandoned RUNNING runs FAILED, saying why in a tag; returns their ids."""
    reaped = []
    mlflow_client = client(uri)
    for run in stale_runs(uri=uri, stale_after=stale_after):
        silent = time.time() - float(run.data.tags[HEARTBEAT_TAG])
        mlflow_client.set_tag(
            run.info.run_id,
            REAPED_TAG,
            f"no heartbeat for {silent:.0f} s (its process died without ending the run); marked FAILED",
        )
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        reaped.append(run.info.run_id)
    return reaped


def register_model(name: str, model_uri: str, *, run_id: str, description: str, uri: str | None = None) -> int:
    """A new version of registered model ``name`` from a logged model; returns the version number."""
    mlflow_client = client(uri)
    try:
        mlflow_client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = mlflow_client.create_model_version(
        name, source=model_uri, run_id=run_id, description=description, model_id=model_id
    )
    return int(version.version)
