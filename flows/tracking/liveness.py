"""Runs that outlive their process: the heartbeat that shows a run is alive, the reaper that ends
abandoned ones, and the link from a Prefect flow run to its MLflow runs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from mlflow.entities import RunStatus

from cnn_train.flows.settings import env_number
from cnn_train.flows.tracking.courier import flush_this_process
from cnn_train.flows.tracking.spool import not_abandoned
from cnn_train.flows.tracking.system_metrics import SystemMetrics
from cnn_train.flows.tracking.uri import check_reachable, client

# Tag linking an MLflow run to the Prefect flow run that produced it.
FLOW_RUN_TAG = "prefect.flow_run_id"
HEARTBEAT_TAG = "cnn_train.heartbeat"
REAPED_TAG = "cnn_train.reaped"
HEARTBEAT_SECONDS = env_number("CNN_TRAIN_HEARTBEAT_SECONDS", 20.0, minimum=0.1)
#: A RUNNING run whose last heartbeat is older than this was abandoned (its process was killed).
STALE_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def heartbeat(uri: str, run_id: str, interval: float | None = None) -> Iterator[None]:
    """Stamp the run every ``interval`` seconds while the block runs, so a run whose process was
    SIGKILLed (and so could not mark itself) is recognisable as stale and can be reaped; and record
    the machine's system metrics meanwhile, resumed when the server answers again after an outage."""
    stop = threading.Event()
    mlflow_client = client(uri)
    period = HEARTBEAT_SECONDS if interval is None else interval
    system = SystemMetrics(uri, run_id)
    system.start()

    def beat() -> None:
        missed = False
        while True:
            try:
                # A quick probe first: MLflow's client would retry a dead server for minutes.
                check_reachable(uri, timeout=2.0, as_client=False)
                mlflow_client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
                if missed:
                    system.resume()
                missed = False
            except Exception:  # noqa: BLE001 - a missed beat (the server away) must not break training
                _log.debug("heartbeat for run %s failed", run_id, exc_info=True)
                missed = True
            if stop.wait(period):
                return

    thread = threading.Thread(target=beat, name=f"mlflow-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        system.stop()


def find_runs_for_flow_run(flow_run_id: str, *, uri: str | None = None) -> list[Any]:
    """MLflow runs tagged with the Prefect flow run id, across experiments."""
    flush_this_process()
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return []
    return mlflow_client.search_runs(experiments, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")


def ending_description(status: str, reason: str) -> str:
    """What stopped a run, as the top of its MLflow page says it: ``**Failed**: reason`` or, for KILLED,
    ``**Stopped before it finished**: reason``."""
    return f"**{'Stopped before it finished' if status == 'KILLED' else 'Failed'}**: {reason}"


def _describe_unless_described(mlflow_client: Any, run: Any, status: str, reason: str) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    if not run.data.tags.get(MLFLOW_RUN_NOTE):  # what the run said of itself stays
        mlflow_client.set_tag(run.info.run_id, MLFLOW_RUN_NOTE, ending_description(status, reason))


def mark_unfinished(run_id: str, status: str, *, uri: str | None = None, reason: str | None = None) -> bool:
    """Mark a run FAILED or KILLED unless it already ended, saying ``reason`` in its description when it
    has none; returns whether it changed."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
        return False
    if reason:
        _describe_unless_described(mlflow_client, run, status, reason)
    mlflow_client.set_terminated(run_id, status=status)
    return True


def stale_runs(*, uri: str | None = None, stale_after: float = STALE_AFTER_SECONDS) -> list[Any]:
    """RUNNING runs written by cnn-train whose heartbeat stopped more than ``stale_after`` seconds ago,
    except runs whose end waits in a spool on this machine (`cnn-train sync` delivers it) and runs whose
    process here still writes them (the server was away, so no heartbeat got through)."""
    flush_this_process()
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return []
    now = time.time()
    running = mlflow_client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return [
        run
        for run in running
        if HEARTBEAT_TAG in run.data.tags
        and now - float(run.data.tags[HEARTBEAT_TAG]) > stale_after
        and not not_abandoned(run.info.run_id)
    ]


def reap_stale_runs(*, uri: str | None = None, stale_after: float = STALE_AFTER_SECONDS) -> list[str]:
    """Mark abandoned RUNNING runs FAILED, saying why in a tag; returns their ids."""
    reaped = []
    mlflow_client = client(uri)
    for run in stale_runs(uri=uri, stale_after=stale_after):
        silent = time.time() - float(run.data.tags[HEARTBEAT_TAG])
        why = f"no heartbeat for {silent:.0f} s (its process died without ending the run)"
        mlflow_client.set_tag(run.info.run_id, REAPED_TAG, f"{why}; marked FAILED")
        _describe_unless_described(mlflow_client, run, "FAILED", why)
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        reaped.append(run.info.run_id)
    return reaped
