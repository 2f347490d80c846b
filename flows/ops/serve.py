"""The deployments cnn-train offers, declared once, and serving them until interrupted.

:data:`DEPLOYMENTS` is the one list: ``cnn-train up`` serves it from this process (flow runs execute
in subprocesses that inherit its environment: MLflow tracking URI, Prefect API URL), and
``prefect.yaml``, which ``cnn-train up --worker`` deploys to a work pool, is generated from it
(:mod:`cnn_train.flows.ops.worker`). Add a deployment here, then regenerate ``prefect.yaml``:
``python -m cnn_train.flows.ops.worker prefect-yaml``.
"""

from __future__ import annotations

import importlib
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Any

#: Tags every cnn-train deployment carries.
TAGS = ("cnn-train",)


@dataclass(frozen=True)
class Deployment:
    """One deployment: its flow by module path (``package.module.flow_object``, which Prefect workers
    import as is), what its form says, and the parameters it runs with unless told otherwise."""

    flow_path: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    name: str = "default"

    def flow(self) -> Any:
        module, _, name = self.flow_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment(
        "cnn_train.flows.train_flow.cnn_train",
        "The lesson's Fashion-MNIST CNN, trained, evaluated and reported, with the dense network beside it.",
        # What `prefect deployment run cnn-train/default` trains unless told otherwise.
        parameters={"compare_dense": True},
    ),
    Deployment(
        "cnn_train.flows.compare_flow.cnn_train_compare",
        "The same config on the keras and torch backends, side by side with a parity verdict.",
    ),
    Deployment(
        "cnn_train.flows.sweep_flow.cnn_train_sweep",
        "A grid of configurations sharing one data prep, ranked in a parent MLflow run "
        "(trials in threads, or on Ray with task_runner ray).",
    ),
    Deployment(
        "cnn_train.flows.tune_flow.cnn_train_tune",
        "An Optuna study (TPE, median pruning) over run fields, resumable by study name "
        "(trials in threads, or on Ray with task_runner ray).",
    ),
    Deployment(
        "cnn_train.flows.predict_flow.cnn_train_predict",
        "Classify a folder of images (-p images=/path) with the champion model, or -p model=...",
    ),
)


def take_back_from_work_pools() -> list[str]:
    """Clear the work pool of every deployment that `cnn-train up --worker` put on one; returns their
    names. Registering a served deployment keeps a pool it already has, and then the pool's workers
    would take its runs too."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in DEPLOYMENTS:
            name = f"{deployment.flow().name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                client.update_deployment(existing.id, DeploymentUpdate(work_pool_name=None))
                taken.append(name)
    return taken


def interruptible() -> None:
    """Make SIGINT stop this process even when it was started with SIGINT ignored, as a shell starts
    a command it runs in the background (``&``, nohup, a CI step); Python then leaves it ignored and
    Ctrl-C, ``kill -INT`` and ``cnn-train down``'s first signal would do nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def served_deployments() -> list[Any]:
    """Prefect's RunnerDeployments for :data:`DEPLOYMENTS`, as ``serve`` registers them."""
    from prefect.types.entrypoint import EntrypointType

    return [
        deployment.flow().to_deployment(
            name=deployment.name,
            parameters=deployment.parameters,
            description=deployment.description,
            tags=list(TAGS),
            # The flow-run process imports cnn_train.flows.<module>, as prefect.yaml's workers do. Loaded from
            # its file instead, the module is named "sweep_flow", and Ray workers, which unpickle a trial's
            # task by its module's name, cannot import that.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for deployment in DEPLOYMENTS
    ]


def main() -> None:
    from prefect import serve

    from cnn_train.flows.settings import state_dir

    interruptible()
    # Prefect's runner keeps a folder of its own under the temp dir and removes it only when its shutdown
    # runs to the end, which a stop by signal does not: each `cnn-train down` left an empty
    # /tmp/runner_storage/<uuid>. In this process only (flow runs and Ray keep the system temp dir) it
    # goes under the state dir, emptied when the process starts (after a SIGKILL) and when it ends.
    scratch = state_dir() / "serve-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    tempfile.tempdir = str(scratch)
    try:
        take_back_from_work_pools()
        serve(*served_deployments())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
