"""The ``cnn-train-compare`` flow: one config, several backends, the same seed and split, side by side.

The parent MLflow run holds the comparison; each backend's training is a child run of its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cnn_train.flows import reporting, tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.errors import ExpectedFailure, one_line_reason
from cnn_train.flows.params import (
    COMPARE_EXCLUDES,
    CompareOptions,
    RunParameters,
    validate_parameters,
)
from cnn_train.flows.signatures import split_values
from cnn_train.flows.runs import cnn_train_flow, figures_from_mlflow, flow_run_tracker, prefect_flow_run_url, run_links
from cnn_train.flows.tasks import ChildRun, child_run, prep_task
from cnn_train.flows.tracking import RunTracker


def validate_compare(values: dict[str, Any]) -> tuple[list[RunParameters], CompareOptions]:
    """Each backend's run parameters and the comparison's options, or one ParameterError."""
    run_values, options = split_values(values, CompareOptions)
    return [validate_parameters(**run_values, backend=name) for name in options.backends], options


@cnn_train_flow("cnn-train-compare", CompareOptions, RunParameters, exclude=COMPARE_EXCLUDES)
def cnn_train_compare(**values: Any) -> dict[str, Any]:
    """Train one config on several backends with the same seed and split, and compare them: each
    backend trains and evaluates on the same split, and the report sets them side by side."""
    per_backend, options = validate_compare(values)
    first = per_backend[0]
    with flow_run_tracker(first.experiment, run_name="compare-" + "-".join(options.backends), role="compare") as parent:
        parent.log_params(first.model_dump(exclude=set(COMPARE_EXCLUDES)) | options.model_dump())
        data = prep_task(first, parent)
        children, failed = _train_each(per_backend, data, parent)
        if len(children) < 2:
            raise ComparisonFailed(_failures_line(failed, children)) from next(iter(failed.values()))
        title = f"{first.architecture} on " + " against ".join(children)
        result = _report(parent, data, children, title=title, tolerance_points=options.tolerance_points)
        if failed:  # the others' comparison is recorded; the run still fails, naming what is missing
            raise ComparisonFailed(_failures_line(failed, children)) from next(iter(failed.values()))
    get_run_logger().info(result["verdict"])
    return result


class ComparisonFailed(ExpectedFailure, RuntimeError):
    """A backend of the comparison failed; the message names each one and why."""


def _train_each(
    per_backend: list[RunParameters], data: PreparedData, parent: RunTracker
) -> tuple[dict[str, ChildRun], dict[str, Exception]]:
    """Each backend's child run, in order; one that fails is set apart and the next still trains (the first
    failure ended the comparison, and no later backend ran)."""
    children: dict[str, ChildRun] = {}
    failed: dict[str, Exception] = {}
    for params in per_backend:
        try:
            children[params.backend] = child_run(
                params, data, parent, run_name=f"{params.backend}-{params.architecture}", role="compare-backend"
            )
        except Exception as error:  # an interruption (KeyboardInterrupt, TerminationSignal) stops them all
            failed[params.backend] = error
            get_run_logger().error("backend %s failed: %s", params.backend, one_line_reason(error))
    return children, failed


def _failures_line(failed: dict[str, Exception], children: dict[str, ChildRun]) -> str:
    line = "; ".join(f"backend {name} failed: {one_line_reason(error)}" for name, error in failed.items())
    if len(children) >= 2:
        return f"{line}; the comparison of {', '.join(children)} is recorded without it"
    if children:
        return f"{line}; {next(iter(children))} trained (its child run), but a comparison needs two backends"
    return line


def _report(
    parent: RunTracker, data: PreparedData, children: dict[str, ChildRun], *, title: str, tolerance_points: float
) -> dict[str, Any]:
    """The side-by-side table, confusion matrices and verdict, to MLflow and to Prefect."""
    rows = [child.row(name) for name, child in children.items()]
    summaries = {
        name: reporting.classification_tables(
            data.y_test, child.evaluated.probabilities.argmax(axis=1), data.class_names
        )
        for name, child in children.items()
    }
    links = {"MLflow parent run": parent.url, "Prefect flow run": prefect_flow_run_url()}
    with tempfile.TemporaryDirectory(prefix="cnn-train-compare-") as out:
        files = reporting.write_comparison_report(
            rows, summaries, Path(out), title=title, tolerance_points=tolerance_points,
            links=links, open_hint=None if parent.url else tracking.open_hint(parent),
        )
        markdown = figures_from_mlflow(files.report_md, parent.uri, parent.run_id, "compare")
        parent.log_artifacts(Path(out), "compare")
    accuracies = {row.name: row.test_accuracy for row in rows}
    verdict = reporting.parity_verdict(accuracies, tolerance_points)
    parent.describe(f"{title}: {verdict}.\n\nThe whole comparison: `compare/{files.report_md.name}` in Artifacts.")
    parent.log_metrics(
        {f"{name}.test_accuracy": value for name, value in accuracies.items()}
        | {"accuracy_gap_points": reporting.accuracy_gap_points(accuracies)}
    )
    create_markdown_artifact(markdown, key="cnn-train-compare")
    table = reporting.comparison_table(rows)
    create_table_artifact(reporting.table_records(table), key="backend-comparison", description=f"{title}: {verdict}")
    return {
        "mlflow_run_id": parent.run_id,
        **run_links(parent),
        "table": table.to_dict(orient="records"),
        "verdict": verdict,
        "report": markdown,
    }
