"""Registering a flow's trained model: the facts its version carries, the champion/challenger
decision, and where that decision is recorded (the run's tags, the flow's log, a Prefect event)."""

from __future__ import annotations

from prefect import get_run_logger, runtime, task
from prefect.events import emit_event

from cnn_train.flows import tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import RunParameters
from cnn_train.flows.runs import prefect_flow_run_url
from cnn_train.flows.tasks import IN_MEMORY
from cnn_train.flows.tracking import Registration, RunTracker, VersionFacts


@task(name="register", **IN_MEMORY)
def register_task(
    name: str,
    *,
    params: RunParameters,
    data: PreparedData,
    model_uri: str,
    run: RunTracker,
    test_accuracy: float,
    description: str,
    record_on: RunTracker | None = None,
) -> Registration:
    """Register ``model_uri`` (trained in ``run``) as a new version of ``name``; champion only if it
    beats the champion on the same test set. The decision goes in the log and on ``record_on``
    (default: ``run``) as tags."""
    facts = VersionFacts(
        test_accuracy=test_accuracy,
        backend=params.backend,
        architecture=params.architecture,
        dataset_digest=data.digest,
        test_set_digest=data.test_digest,
        mlflow_run_id=run.run_id,
        mlflow_run_url=run.url,
        prefect_flow_run_id=str(runtime.flow_run.id or "") or None,
        prefect_flow_run_url=prefect_flow_run_url(),
    )
    registration = tracking.register_version(name, model_uri, facts=facts, description=description, uri=run.uri)
    (record_on or run).set_tags({
        "cnn_train.registered_model": f"{name}/{registration.version}",
        "cnn_train.registered_alias": registration.alias,
        "cnn_train.registered_reason": registration.reason,
    })
    get_run_logger().info(registration.line())
    emit_registered(registration, facts)
    return registration


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
