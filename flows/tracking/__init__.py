"""Everything cnn-train says to MLflow goes through this package, with explicit run ids and public
MLflow APIs only.

- :mod:`.uri`: which store, whether it answers, and links (or the command) to browse a run.
- :mod:`.runs`: experiments and :class:`RunTracker` (params, metrics, tags, datasets, artifacts, ending).
- :mod:`.liveness`: heartbeats, the stale-run reaper, the MLflow runs of a Prefect flow run.
- :mod:`.models`: logging a backend's :class:`~cnn_train.plugins.contract.LoggableModel`, the registry.
"""

from __future__ import annotations

import os

# MLflow ignores DO_NOT_TRACK=1 (it wants "true"); nothing here may reach for the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cnn_train.flows.tracking.liveness import (  # noqa: E402
    FLOW_RUN_TAG,
    HEARTBEAT_SECONDS,
    HEARTBEAT_TAG,
    REAPED_TAG,
    STALE_AFTER_SECONDS,
    find_runs_for_flow_run,
    heartbeat,
    mark_unfinished,
    reap_stale_runs,
    stale_runs,
)
from cnn_train.flows.tracking.models import (  # noqa: E402
    PYFUNC,
    UnloggableModelError,
    check_loggable,
    log_model,
    register_model,
)
from cnn_train.flows.tracking.runs import (  # noqa: E402
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    RunTracker,
    ensure_experiment,
    source_tags,
)
from cnn_train.flows.tracking.uri import (  # noqa: E402
    RunAddress,
    TrackingUnavailableError,
    artifact_url,
    check_reachable,
    client,
    open_hint,
    run_url,
    tracking_uri,
    ui_base_url,
)

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "FLOW_RUN_TAG",
    "HEARTBEAT_SECONDS",
    "HEARTBEAT_TAG",
    "MODEL_TRAINING_KIND",
    "PYFUNC",
    "REAPED_TAG",
    "RunAddress",
    "STALE_AFTER_SECONDS",
    "RunTracker",
    "TrackingUnavailableError",
    "UnloggableModelError",
    "artifact_url",
    "check_loggable",
    "check_reachable",
    "client",
    "ensure_experiment",
    "find_runs_for_flow_run",
    "heartbeat",
    "log_model",
    "mark_unfinished",
    "open_hint",
    "reap_stale_runs",
    "register_model",
    "run_url",
    "source_tags",
    "stale_runs",
    "tracking_uri",
    "ui_base_url",
]
