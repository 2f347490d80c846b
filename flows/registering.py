"""Registering a flow's trained model: the facts its version carries, the champion/challenger
decision, and where that decision is recorded (the run's tags, the flow's log, a Prefect event)."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.events import emit_event

from cnn_train.flows import tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import RunParameters
from cnn_train.flows.runs import prefect_flow_run_url
from cnn_train.flows.tasks import IN_MEMORY
from cnn_train.flows.tracking import Registration, RunTracker, VersionFacts


@task(name="register", task_run_name="register", **IN_MEMORY)
def register_task(
    name: str,
    *,
    params: RunParameters,
    data: PreparedData,
    model_uri: str | None,
    run: RunTracker,
    test_accuracy: float,
    source: str | None = None,
    record_on: RunTracker | None = None,
) -> Registration | None:
    """Register ``model_uri`` (trained in ``run``) as a new version of ``name``; champion only if it
    beats the champion on the same test set. The decision goes in the log and on ``record_on``
    (default: ``run``) as tags. While MLflow does not answer, the registration waits in ``run``'s spool
    and is made when it is delivered (None here). Every version's description reads the same way: what
    was trained, its test accuracy on how many images, then ``source`` (a search's best trial and its values)."""
    description = f"{params.backend} {params.architecture}, test_accuracy={test_accuracy:.4f} on {len(data.y_test):,} test images"
    description += f". {source}" if source else ""
    facts = VersionFacts(
        backend=params.backend,
        architecture=params.architecture,
        dataset_digest=data.digest,
        test_accuracy=test_accuracy,
        test_set_digest=data.test_digest,
        test_images=len(data.y_test),
        mlflow_run_id=run.run_id,
        mlflow_run_url=run.url,
        prefect_flow_run_id=str(runtime.flow_run.id or "") or None,
        prefect_flow_run_url=prefect_flow_run_url(),
    )
    if model_uri is None or not _answers(run.uri):  # the model (or the registry) waits for MLflow
        run.register_later(name, dataclasses.asdict(facts), description, model_uri=model_uri, record_on=(record_on or run).run_id)
        get_run_logger().warning(
            "run %s's model waits for MLflow: it is registered as a new version of %s once MLflow has the run's "
            "records (as soon as it answers, or with `cnn-train sync`), champion or challenger by the same rule", run.run_id, name,
        )
        return None
    registration = tracking.register_version(name, model_uri, facts=facts, description=description, uri=run.uri)
    (record_on or run).set_tags(tracking.registration_tags(registration))
    get_run_logger().info(registration.line())
    if registration.new:  # nothing new to react to otherwise
        emit_registered(registration, facts)
    return registration


def _answers(uri: str) -> bool:
    try:
        tracking.check_reachable(uri, timeout=2.0, as_client=False)
    except tracking.TrackingUnavailableError:
        return False
    return True


def registered_summary(name: str, registration: Registration | None) -> dict[str, Any]:
    """A search's result entries for its registration, or for one that waits for MLflow."""
    if registration is None:
        return {"registered_version": None, "registration": f"the registration as {name} waits for MLflow (`cnn-train sync`)"}
    return {"registered_version": registration.version, "registration": registration.line()}


#: The event a registration emits, ending in the alias the version got: an automation can react to a new
#: champion (serve it, run predictions, tell the team) with ``expect: ["cnn-train.model-version.champion"]``.
REGISTERED_EVENT = "cnn-train.model-version.{alias}"


def emit_registered(registration: Registration, facts: VersionFacts) -> None:
    """A Prefect event for the new version; inside a flow run Prefect relates it to the run, flow and deployment."""
    emit_event(
        event=REGISTERED_EVENT.format(alias=registration.alias),
        resource={
            "prefect.resource.id": f"mlflow.model-version.{registration.name}.{registration.version}",
            "prefect.resource.name": f"{registration.name} version {registration.version}",
        },
        payload={
            "name": registration.name,
            "version": registration.version,
            "model_uri": f"models:/{registration.name}/{registration.version}",
            "alias": registration.alias,
            "reason": registration.reason,
            "test_accuracy": facts.test_accuracy,
            "backend": facts.backend,
            "architecture": facts.architecture,
            "mlflow_run_id": facts.mlflow_run_id,
        },
    )
