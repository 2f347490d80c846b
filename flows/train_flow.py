"""The ``cnn-train`` flow: prepare the data, train, evaluate, report; every run in MLflow.

Task bodies are thin: each asks the placement module for its device, calls a plain function
from :mod:`cnn_train.flows.steps` or :mod:`cnn_train.flows.reports`, and records what it did.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal

from cnn_train.flows import reports, steps, tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import RunParameters, validate_parameters
from cnn_train.flows.placement import Placement, check_satisfiable, place_task
from cnn_train.flows.settings import state_dir
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import EpochMetrics

# Arrays and models pass between tasks in memory; persisting them would copy ~200 MB per run.
_IN_MEMORY = {"cache_policy": NO_CACHE, "persist_result": False}


def _record_placement(tracker: RunTracker, placement: Placement) -> None:
    tracker.set_tags(placement.as_tags())


def _progress_line(metrics: EpochMetrics, epochs: int, label: str) -> str:
    width = 20
    filled = round(width * metrics.epoch / epochs)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"{label} epoch {metrics.epoch}/{epochs} [{bar}] loss {metrics.loss:.4f} acc {metrics.accuracy:.4f} "
        f"val_loss {metrics.val_loss:.4f} val_acc {metrics.val_accuracy:.4f} "
        f"({metrics.seconds:.1f} s, {metrics.images_per_second:.0f} img/s)"
    )


@task(name="prep", **_IN_MEMORY)
def prep_task(params: RunParameters, tracker: RunTracker) -> PreparedData:
    """Load Fashion-MNIST, split it, and record the datasets and parameters."""
    logger = get_run_logger()
    with place_task("prep", params.prep_device, logger=logger) as placement:
        _record_placement(tracker, placement)
        data = steps.prepare(params)
        steps.log_datasets(tracker, data)
    logger.info("data: %s from %s", data.summary(), data.source)
    return data


@task(name="train", retries=1, retry_delay_seconds=2, **_IN_MEMORY)
def train_task(params: RunParameters, data: PreparedData, tracker: RunTracker, *, label: str) -> steps.TrainOutcome:
    """Train on the placed device, logging each epoch as it ends; a retry resumes from the last epoch."""
    logger = get_run_logger()
    progress = create_progress_artifact(
        0.0, key=f"{label}-training-progress", description=f"{label}: epochs completed"
    )

    def report_epoch(metrics: EpochMetrics) -> None:
        logger.info(_progress_line(metrics, params.epochs, label))
        update_progress_artifact(progress, 100.0 * metrics.epoch / params.epochs)

    with place_task("train", params.train_device, logger=logger) as placement:
        _record_placement(tracker, placement)
        outcome = steps.train(
            params,
            data,
            tracker,
            device=placement.device,
            checkpoint=state_dir() / "checkpoints" / tracker.run_id,
            on_epoch=report_epoch,
        )
    if outcome.resumed_from_epoch:
        logger.warning("resumed after epoch %d of an earlier attempt", outcome.resumed_from_epoch)
    return outcome


@task(name="evaluate", **_IN_MEMORY)
def evaluate_task(
    params: RunParameters,
    trained: steps.TrainOutcome,
    data: PreparedData,
    tracker: RunTracker,
) -> steps.EvalOutcome:
    """Test loss and accuracy, per-class precision/recall/F1 on the test set."""
    logger = get_run_logger()
    with place_task("evaluate", params.evaluate_device, logger=logger) as placement:
        _record_placement(tracker, placement)
        outcome = steps.evaluate(params, trained, data, device=placement.device)
    tracker.log_metrics(steps.test_metrics(outcome, data), step=params.epochs)
    logger.info("test accuracy %.4f, test loss %.4f", outcome.evaluation.accuracy, outcome.evaluation.loss)
    return outcome


@dataclass(frozen=True)
class ChildRun:
    """A training and evaluation recorded as its own MLflow run under a parent run."""

    run_id: str
    trained: steps.TrainOutcome
    evaluated: steps.EvalOutcome

    def row(self, name: str) -> reports.ComparisonRow:
        return reports.ComparisonRow(
            name=name,
            test_accuracy=self.evaluated.evaluation.accuracy,
            parameters=self.trained.parameters,
            seconds_per_epoch=self.trained.seconds_per_epoch,
            images_per_second=self.trained.images_per_second,
        )


def train_child_run(
    params: RunParameters, data: PreparedData, parent: RunTracker, *, run_name: str, role: str
) -> ChildRun:
    child = RunTracker.start(
        params.experiment,
        run_name=run_name,
        tags=flow_run_tags() | {"cnn_train.role": role},
        parent_run_id=parent.run_id,
        uri=parent.uri,
    )
    with ended(child):
        steps.log_run_params(child, params)
        steps.log_datasets(child, data)
        trained = train_task(params, data, child, label=run_name)
        evaluated = evaluate_task(params, trained, data, child)
    return ChildRun(child.run_id, trained, evaluated)


@task(name="report", **_IN_MEMORY)
def report_task(
    params: RunParameters,
    data: PreparedData,
    trained: steps.TrainOutcome,
    evaluated: steps.EvalOutcome,
    tracker: RunTracker,
    dense: reports.ComparisonRow | None,
) -> Path:
    """Figures, tables and report.md, to MLflow and as Prefect artifacts."""
    logger = get_run_logger()
    with place_task("report", params.report_device, logger=logger) as placement:
        _record_placement(tracker, placement)
        inputs = reports.ReportInputs(
            backend=params.backend,
            model_config=params.model(),
            train_config=params.training(),
            history=trained.history,
            test=evaluated.evaluation,
            device=None,
            run_name=tracker.run_id,
            parameter_count=trained.parameters,
            mlflow_run_url=tracker.url,
            prefect_flow_run_url=runtime.flow_run.ui_url,
            dense_baseline=dense,
            class_names=data.class_names,
        )
        out_dir = Path(tempfile.mkdtemp(prefix="cnn-train-report-"))
        files = reports.write_report(
            inputs,
            out_dir,
            images=data.x_test,
            y_true=data.y_test,
            probabilities=evaluated.probabilities,
            kernels=evaluated.kernels,
            feature_maps=evaluated.feature_maps,
        )
        tracker.log_artifacts(out_dir, "report")
    markdown = files.report_md.read_text(encoding="utf-8")
    if tracking.ui_base_url(tracker.uri):
        # The Prefect UI has no files beside the report: point its figures at the MLflow server.
        def figure_url(name: str) -> str:
            return tracking.artifact_url(tracker.uri, tracker.run_id, f"report/{name}") or name

        markdown = reports.relink_figures(markdown, figure_url)
        drawn = {path.name for path in files.figures.paths()}
        for figure in ("learning_curves.png", "confusion_matrix.png", "feature_maps.png"):
            if figure in drawn:
                create_image_artifact(figure_url(figure), key=figure.removesuffix(".png").replace("_", "-"))
    create_markdown_artifact(markdown, key="cnn-train-report", description="cnn-train run report")
    per_class = reports.classification_tables(
        data.y_test, evaluated.probabilities.argmax(axis=1), data.class_names
    ).per_class
    create_table_artifact(per_class.round(4).to_dict(orient="records"), key="per-class-metrics")
    if dense is not None:
        this = reports.ComparisonRow(
            name="CNN",
            test_accuracy=evaluated.evaluation.accuracy,
            parameters=trained.parameters,
            seconds_per_epoch=trained.seconds_per_epoch,
            images_per_second=trained.images_per_second,
        )
        table = reports.comparison_table([this, dense])
        create_table_artifact(table.round(4).to_dict(orient="records"), key="cnn-against-dense")
    if tracking.ui_base_url(tracker.uri):
        create_link_artifact(tracker.url, link_text="MLflow run", key="mlflow-run")
    logger.info("report written: %s", files.report_md)
    return files.report_md


def flow_run_tags() -> dict[str, str]:
    tags = {
        tracking.FLOW_RUN_TAG: str(runtime.flow_run.id or ""),
        "prefect.flow_run_name": str(runtime.flow_run.name or ""),
        "prefect.deployment": str(runtime.deployment.name or ""),
    }
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    return {k: v for k, v in tags.items() if v}


def _reap_abandoned_runs(logger: Any) -> None:
    """Runs whose process was SIGKILLed stay RUNNING forever; the next start marks them FAILED."""
    for run_id in tracking.reap_stale_runs():
        logger.warning("marked abandoned MLflow run %s FAILED (its heartbeat had stopped)", run_id)


def _status_for(error: BaseException) -> str:
    """KILLED for interruptions and cancellations, FAILED for everything else."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, TerminationSignal)) else "FAILED"


@contextlib.contextmanager
def ended(tracker: RunTracker) -> Iterator[None]:
    """Heartbeat the MLflow run while the block runs, then end it FINISHED, or KILLED when
    interrupted (Ctrl-C, SIGTERM, a cancellation), or FAILED: never left RUNNING."""
    try:
        with tracker.heartbeat():
            yield
    except BaseException as error:
        tracker.finish(_status_for(error))
        raise
    tracker.finish("FINISHED")


def mark_runs_hook(status: str) -> Any:
    """A Prefect state hook marking this flow run's MLflow runs, for when the flow body could not."""

    def hook(flow_obj: Any, flow_run: Any, state: Any) -> None:
        for run in tracking.find_runs_for_flow_run(str(flow_run.id)):
            tracking.mark_unfinished(run.info.run_id, status)

    return hook


def recorded_flow() -> dict[str, Any]:
    """Options every cnn-train flow shares: its MLflow runs end KILLED or FAILED with the flow run, even
    when the flow body never reaches its own cleanup; results stay in memory (MLflow holds what lasts).
    Fresh hook lists per flow, since Prefect appends to them in place."""
    return {
        "on_cancellation": [mark_runs_hook("KILLED")],
        "on_crashed": [mark_runs_hook("FAILED")],
        "persist_result": False,
    }


@flow(
    name="cnn-train",
    description="Train, evaluate and report the Fashion-MNIST CNN; every run is logged to MLflow.",
    **recorded_flow(),
)
def cnn_train(
    backend: str = "torch",
    architecture: str = "cnn",
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    seed: int = 42,
    validation_fraction: float = 0.1,
    sample_limit: int | None = None,
    test_limit: int | None = None,
    experiment: str = "cnn-train",
    data_dir: str | None = None,
    compare_dense: bool = False,
    prep_device: str = "cpu",
    train_device: str = "gpu-preferred",
    evaluate_device: str = "gpu-preferred",
    report_device: str = "cpu",
) -> dict[str, Any]:
    """Prepare Fashion-MNIST, train the chosen backend, evaluate on the test set, report.

    Args:
        epochs: Passes over the training set; empty for the architecture's default (10, or the
            recipe's 7 for cnn-improved).
        batch_size: Images per optimizer step; empty for the architecture's default (32, or 128).
        learning_rate: Adam learning rate (the peak of cnn-improved's one-cycle schedule); empty for
            the architecture's default (0.001, or 0.003).
    """
    params = validate_parameters(**{k: v for k, v in locals().items()})
    # A GPU that no wait can produce fails the run here, before an MLflow run exists.
    check_satisfiable(params.device_requests())
    logger = get_run_logger()
    tracking.check_reachable(tracking.tracking_uri())
    _reap_abandoned_runs(logger)
    tracker = RunTracker.start(
        params.experiment, run_name=f"{params.backend}-{params.architecture}", tags=flow_run_tags()
    )
    logger.info("MLflow run %s: %s", tracker.run_id, tracker.url)
    with ended(tracker):
        steps.log_run_params(tracker, params)
        data = prep_task(params, tracker)
        trained = train_task(params, data, tracker, label=params.architecture)
        evaluated = evaluate_task(params, trained, data, tracker)
        dense = None
        if params.compare_dense and params.architecture == "cnn":
            dense_params = params.model_copy(update={"architecture": "dense", "compare_dense": False})
            baseline = train_child_run(
                dense_params, data, tracker, run_name=f"{params.backend}-dense-baseline", role="dense-baseline"
            )
            dense = baseline.row("dense network")
            tracker.log_metrics(
                {"dense.test_accuracy": dense.test_accuracy, "dense.parameters": dense.parameters or 0}
            )
        report_task(params, data, trained, evaluated, tracker, dense)
    return {
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_url": tracker.url,
        "test_accuracy": evaluated.evaluation.accuracy,
        "test_loss": evaluated.evaluation.loss,
        "dense_test_accuracy": dense.test_accuracy if dense else None,
    }
