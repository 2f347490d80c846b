"""The Prefect tasks the flows share (prep, train, evaluate) and a training recorded as a child run.

Task bodies are thin: each asks the placement module for its device, calls a plain function from
:mod:`cnn_train.flows.steps`, and records what it did.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from cnn_train.flows import interrupts, reporting, steps
from cnn_train.flows.data import PreparedData
from cnn_train.flows.diskspace import disk_full
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.params import RunParameters
from cnn_train.flows.placement import Placement, place_task
from cnn_train.flows.ray_cluster import node_tags
from cnn_train.flows.runs import ended, flow_run_tags
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import EpochMetrics

# Arrays and models pass between tasks in memory; persisting them would copy ~200 MB per run.
IN_MEMORY = {"cache_policy": NO_CACHE, "persist_result": False}


def progress_line(metrics: EpochMetrics, epochs: int, label: str) -> str:
    """One log line per epoch, with a bar, the four metrics and the epoch's speed."""
    width = 20
    filled = round(width * metrics.epoch / epochs)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"{label} epoch {metrics.epoch}/{epochs} [{bar}] loss {metrics.loss:.4f} acc {metrics.accuracy:.4f} "
        f"val_loss {metrics.val_loss:.4f} val_acc {metrics.val_accuracy:.4f} "
        f"({metrics.seconds:.1f} s, {metrics.images_per_second:.0f} img/s)"
    )


#: Failures a retry would meet again: a diverged training diverges again from its last checkpoint, a
#: user-fixable failure (a refused input, a backend breaking the contract) and a programming error in
#: a backend are deterministic, and a full disk is still full 2 s later (:func:`diskspace.disk_full`).
#: What is left (a lost connection, a CUDA error) is retried.
NOT_RETRIED: tuple[type[BaseException], ...] = (
    steps.TrainingDiverged, ExpectedFailure, ValueError, LookupError, AttributeError, NameError, TypeError,
    ImportError, NotImplementedError, SyntaxError,
)


def retry_unless_deterministic(task: object, task_run: object, state: State[Any]) -> bool:
    """The train and trial tasks' ``retry_condition_fn``: a retry resumes from the last checkpoint, which
    pays only for a failure that may not happen again (Prefect passes the raised exception as the state's data)."""
    return not isinstance(state.data, NOT_RETRIED) and not disk_full(state.data)


@task(name="prep", task_run_name="prep", **IN_MEMORY)
def prep_task(params: RunParameters, tracker: RunTracker) -> PreparedData:
    """Load Fashion-MNIST, split it, and record the datasets."""
    logger = get_run_logger()
    with place_task("prep", params.prep_device, logger=logger) as placement:
        tracker.set_tags(placement.as_tags())
        data = steps.prepare(params)
        steps.log_datasets(tracker, data)
    logger.info("data: %s from %s", data.summary(), data.source)
    return data


# Named after what they train ("train-cnn", "train-torch-dense-baseline"): the CNN's and the dense network's
# tasks read "train-34b" and "train-ac1" in the flow run's graph and logs.
@task(name="train", task_run_name="train-{label}", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_deterministic, **IN_MEMORY)
def train_task(params: RunParameters, data: PreparedData, tracker: RunTracker, *, label: str) -> steps.TrainOutcome:
    """Train on the placed device, logging each epoch as it ends; a retry resumes from the last epoch."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"{label}-training-progress", description=f"{label}: epochs completed")

    def report_epoch(metrics: EpochMetrics) -> None:
        logger.info(progress_line(metrics, params.epochs, label))
        update_progress_artifact(progress, 100.0 * metrics.epoch / params.epochs)

    with place_task("train", params.train_device, logger=logger) as placement:
        tracker.set_tags(placement.as_tags())
        outcome = steps.train(params, data, tracker, device=placement.device, on_epoch=report_epoch)
    if outcome.resumed_from_epoch:
        logger.warning("resumed after epoch %d of an earlier attempt", outcome.resumed_from_epoch)
    return outcome


@task(name="evaluate", task_run_name="evaluate-{label}", **IN_MEMORY)
def evaluate_task(
    params: RunParameters, trained: steps.TrainOutcome, data: PreparedData, tracker: RunTracker, *, label: str
) -> steps.EvalOutcome:
    """Test loss and accuracy, per-class precision/recall/F1 on the test set."""
    logger = get_run_logger()
    with place_task("evaluate", params.evaluate_device, logger=logger) as placement:
        tracker.set_tags(placement.as_tags())
        outcome = steps.evaluate(params, trained, data, device=placement.device)
    steps.log_test_metrics(tracker, steps.test_metrics(outcome, data), step=params.epochs, model_uri=trained.model_uri, data=data)
    logger.info("test accuracy %.4f, test loss %.4f", outcome.evaluation.accuracy, outcome.evaluation.loss)
    return outcome


@dataclass(frozen=True)
class ChildRun:
    """A training and evaluation recorded as its own MLflow run under a parent run."""

    run_id: str
    trained: steps.TrainOutcome
    evaluated: steps.EvalOutcome

    def row(self, name: str) -> reporting.ComparisonRow:
        return reporting.ComparisonRow.of(
            name, self.trained.history, self.evaluated.evaluation.accuracy, self.trained.parameters
        )


#: How a child run trains and evaluates (params, data, its tracker, a label for logs): as Prefect tasks,
#: or as plain steps inside one task (a sweep trial).
Work = Callable[[RunParameters, PreparedData, RunTracker, str], tuple[steps.TrainOutcome, steps.EvalOutcome]]


def as_tasks(
    params: RunParameters, data: PreparedData, tracker: RunTracker, label: str
) -> tuple[steps.TrainOutcome, steps.EvalOutcome]:
    """Train and evaluate as the flow's own tasks."""
    trained = train_task(params, data, tracker, label=label)
    return trained, evaluate_task(params, trained, data, tracker, label=label)


def child_run(
    params: RunParameters,
    data: PreparedData,
    parent: RunTracker,
    *,
    run_name: str,
    role: str,
    work: Work = as_tasks,
    tags: dict[str, str] | None = None,
    key: str | None = None,
) -> ChildRun:
    """Train and evaluate ``params`` in a child MLflow run of ``parent``, ended like any run.

    ``tags`` defaults to this flow run's; a trial on a Ray worker passes the driver's. With ``key``
    (letters and digits, unique under ``parent``), a retry reopens the child run of an earlier attempt
    and its training resumes from that run's checkpoint, so a retried training is still one run.
    """
    run_tags = (flow_run_tags() if tags is None else tags) | {"cnn_train.role": role}
    if key is None:
        child = RunTracker.start(
            params.experiment, run_name=run_name, tags=run_tags, parent_run_id=parent.run_id, uri=parent.uri
        )
    else:
        child = RunTracker.reopen_or_start(
            params.experiment, key=key, run_name=run_name, tags=run_tags, parent_run_id=parent.run_id, uri=parent.uri
        )
    with ended(child):
        steps.log_run_params(child, params)
        steps.log_datasets(child, data)
        trained, evaluated = work(params, data, child, run_name)
    return ChildRun(child.run_id, trained, evaluated)


@contextlib.contextmanager
def placed_trial(params: RunParameters, child: RunTracker, *, scheduler_assigned: bool, logger: Any) -> Iterator[Placement]:
    """A sweep's or study's trial training and evaluating: on the device its request (or Ray) gives it,
    said in its child run's tags, and stopped with its flow run (interrupts.py)."""
    if scheduler_assigned:
        child.set_tags(node_tags())
    with interrupts.trial(), place_task(
        "train", params.train_device, logger=logger, assigned_by_scheduler=scheduler_assigned
    ) as placement:
        # The trial evaluates in this task too, on the same device: both are recorded.
        child.set_tags(placement.as_tags() | dataclasses.replace(placement, task="evaluate").as_tags())
        yield placement
