"""Everything cnn-train says to MLflow goes through this package, with explicit run ids and public
MLflow APIs only.

- :mod:`.uri`: which store, whether it answers, and links (or the command) to browse a run.
- :mod:`.runs`: experiments and :class:`RunTracker` (params, metrics, tags, datasets, artifacts, ending).
- :mod:`.liveness`: heartbeats, the stale-run reaper, the MLflow runs of a Prefect flow run.
- :mod:`.spool`: what a run logs, kept on disk and delivered in order by a courier thread (outages lose nothing).
- :mod:`.system_metrics`: MLflow's CPU/memory/GPU monitor for each run.
- :mod:`.models`: logging a backend's :class:`~cnn_train.plugins.contract.LoggableModel`, loading one.
- :mod:`.registry`: registered versions with their facts, and the champion/challenger aliases.
- :mod:`.lookup`: the model a prediction uses (named, or the champion, or the latest run's) and what exists.
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
    ending_description,
    find_runs_for_flow_run,
    heartbeat,
    mark_unfinished,
    reap_stale_runs,
    stale_runs,
)
from cnn_train.flows.tracking.lookup import ModelChoice, ModelNotFoundError, default_model, locate  # noqa: E402
from cnn_train.flows.tracking.models import (  # noqa: E402
    OUTPUT_NAME,
    PYFUNC,
    ModelRecord,
    UnloggableModelError,
    check_loggable,
    link_model_input,
    load_pyfunc,
    log_model,
    register_model,
)
from cnn_train.flows.tracking.registry import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    Registration,
    UnknownModelNameError,
    VersionFacts,
    register_version,
    registration_line,
    registration_tags,
    registered_versions,
)
from cnn_train.flows.tracking.spool import Spool, has_waiting_records, waiting_spools  # noqa: E402
from cnn_train.flows.tracking.spool import sync as sync_spools  # noqa: E402
from cnn_train.flows.tracking.runs import (  # noqa: E402
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    DeletedExperimentError,
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
    experiment_url,
    open_hint,
    ready_store,
    run_url,
    tracking_uri,
    ui_base_url,
    waiting_on,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DeletedExperimentError",
    "EXPERIMENT_KIND_TAG",
    "FLOW_RUN_TAG",
    "HEARTBEAT_SECONDS",
    "HEARTBEAT_TAG",
    "MODEL_TRAINING_KIND",
    "ModelChoice",
    "ModelNotFoundError",
    "ModelRecord",
    "OUTPUT_NAME",
    "PYFUNC",
    "REAPED_TAG",
    "Registration",
    "RunAddress",
    "RunTracker",
    "Spool",
    "STALE_AFTER_SECONDS",
    "TrackingUnavailableError",
    "UnknownModelNameError",
    "UnloggableModelError",
    "VersionFacts",
    "artifact_url",
    "check_loggable",
    "check_reachable",
    "client",
    "default_model",
    "ending_description",
    "ensure_experiment",
    "experiment_url",
    "find_runs_for_flow_run",
    "heartbeat",
    "link_model_input",
    "load_pyfunc",
    "locate",
    "log_model",
    "mark_unfinished",
    "open_hint",
    "ready_store",
    "reap_stale_runs",
    "register_model",
    "register_version",
    "registration_line",
    "registration_tags",
    "registered_versions",
    "run_url",
    "source_tags",
    "sync_spools",
    "has_waiting_records",
    "waiting_on",
    "waiting_spools",
    "stale_runs",
    "tracking_uri",
    "ui_base_url",
]
