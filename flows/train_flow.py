"""The ``cnn-train`` flow: prepare the data, train, evaluate, report; every run in MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from cnn_train.flows import reporting, steps, tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import RunParameters, validate_parameters
from cnn_train.flows.placement import place_task
from cnn_train.flows.registering import register_task
from cnn_train.flows.runs import cnn_train_flow, figures_from_mlflow, flow_run_tracker, prefect_flow_run_url, run_links
from cnn_train.flows.tasks import IN_MEMORY, child_run, evaluate_task, prep_task, train_task
from cnn_train.flows.tracking import RunTracker

#: Figures the Prefect UI shows as image artifacts, served by the MLflow server.
_PREFECT_FIGURES = ("learning_curves.png", "confusion_matrix.png", "feature_maps.png")


@task(name="report", task_run_name="report", **IN_MEMORY)
def report_task(
    params: RunParameters,
    data: PreparedData,
    trained: steps.TrainOutcome,
    evaluated: steps.EvalOutcome,
    tracker: RunTracker,
    dense: reporting.ComparisonRow | None,
) -> str:
    """Figures, tables and report.md, to MLflow and as Prefect artifacts."""
    logger = get_run_logger()
    with place_task("report", params.report_device, logger=logger) as placement:
        tracker.set_tags(placement.as_tags())
        inputs = reporting.ReportInputs(
            backend=params.backend,
            model_config=params.model(),
            train_config=trained.training,
            history=trained.history,
            test=evaluated.evaluation,
            run_name=tracker.run_id,
            parameter_count=trained.parameters,
            mlflow_run_url=tracker.url,
            mlflow_open_hint=tracking.open_hint(tracker),
            prefect_flow_run_url=prefect_flow_run_url(),
            dense_baseline=dense,
            class_names=data.class_names,
            images=data.summary(),
        )
        # Written beside nothing else and removed once MLflow holds it: no report folders pile up.
        with tempfile.TemporaryDirectory(prefix="cnn-train-report-") as out:
            files = reporting.write_report(
                inputs,
                Path(out),
                images=data.x_test,
                y_true=data.y_test,
                probabilities=evaluated.probabilities,
                kernels=evaluated.kernels,
                feature_maps=evaluated.feature_maps,
            )
            markdown = figures_from_mlflow(files.report_md, tracker.uri, tracker.run_id, "report")
            tracker.log_artifacts(Path(out), "report")
            drawn = {path.name for path in files.figures.paths()}
        tracker.describe(reporting.run_description(inputs))
    label = f"{inputs.architecture_label} ({params.backend} backend)"
    _publish_to_prefect(markdown, drawn, tracker, evaluated, data, label=label, this=inputs.as_comparison_row("CNN"), dense=dense)
    logger.info("report logged to MLflow run %s under report/", tracker.run_id)
    return markdown


def _publish_to_prefect(
    markdown: str,
    drawn: set[str],
    tracker: RunTracker,
    evaluated: steps.EvalOutcome,
    data: PreparedData,
    *,
    label: str,
    this: reporting.ComparisonRow,
    dense: reporting.ComparisonRow | None,
) -> None:
    """The report, its figures (where an MLflow server serves them) and its tables as Prefect artifacts."""
    if tracker.url:  # an MLflow server, which serves the figures
        for figure in (name for name in _PREFECT_FIGURES if name in drawn):
            url = tracking.artifact_url(tracker.uri, tracker.run_id, f"report/{figure}") or figure
            create_image_artifact(url, key=figure.removesuffix(".png").replace("_", "-"))
        create_link_artifact(tracker.url, link_text="MLflow run", key="mlflow-run")
    create_markdown_artifact(markdown, key="cnn-train-report", description="cnn-train run report")
    per_class = reporting.classification_tables(
        data.y_test, evaluated.probabilities.argmax(axis=1), data.class_names
    ).per_class
    create_table_artifact(
        reporting.table_records(per_class), key="per-class-metrics",
        description=f"Precision, recall and F1 per class of the {label}, over {len(data.y_test):,} test images.",
    )
    if dense is not None:
        table = reporting.comparison_table([this, dense])
        create_table_artifact(
            reporting.table_records(table), key="cnn-against-dense",
            description=reporting.cnn_against_dense_sentence(this, dense),
        )


@cnn_train_flow("cnn-train", RunParameters)
def cnn_train(**values: Any) -> dict[str, Any]:
    """Train, evaluate and report the Fashion-MNIST CNN: prepare the data, train the chosen backend,
    evaluate on the test set, report; every run is logged to MLflow."""
    params = validate_parameters(**values)
    with flow_run_tracker(params.experiment, run_name=f"{params.backend}-{params.architecture}") as tracker:
        steps.log_run_params(tracker, params)
        data = prep_task(params, tracker)
        trained = train_task(params, data, tracker, label=params.architecture)
        evaluated = evaluate_task(params, trained, data, tracker, label=params.architecture)
        if params.compare_dense and not params.trains_dense_baseline:
            get_run_logger().info("compare_dense: this run trains the dense network itself; there is no other to compare")
        dense = _dense_baseline(params, data, tracker) if params.trains_dense_baseline else None
        report_task(params, data, trained, evaluated, tracker, dense)
        registration = (
            register_task(
                params.register, params=params, data=data, model_uri=trained.model_uri, run=tracker,
                test_accuracy=evaluated.evaluation.accuracy,
            )
            if params.register
            else None
        )
    return {
        "mlflow_run_id": tracker.run_id,
        **run_links(tracker),
        "test_accuracy": evaluated.evaluation.accuracy,
        "test_loss": evaluated.evaluation.loss,
        "dense_test_accuracy": dense.test_accuracy if dense else None,
        "registration": registration.line() if registration else None,
    }


def dense_baseline_params(params: RunParameters) -> RunParameters:
    """The dense baseline's own parameters: the run's, for the dense network, which compares with nothing
    and is registered nowhere (its run showed the CNN's `register` as its own)."""
    return params.model_copy(update={"architecture": "dense", "compare_dense": False, "register": None})


def _dense_baseline(params: RunParameters, data: PreparedData, tracker: RunTracker) -> reporting.ComparisonRow:
    """The previous lesson's dense network on the same split, as a child run."""
    baseline = child_run(
        dense_baseline_params(params), data, tracker, run_name=f"{params.backend}-dense-baseline", role="dense-baseline"
    )
    row = baseline.row("dense network")
    tracker.log_metrics({"dense.test_accuracy": row.test_accuracy})
    # A count of the network, a param as the CNN's own model.parameters is (as a metric it was charted).
    tracker.log_params({"dense.model.parameters": row.parameters})
    return row
