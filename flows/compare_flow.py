"""The ``cnn-train-compare`` flow: one config, several backends, the same seed and split, side by side.

The parent MLflow run holds the comparison; each backend's training is a child run of its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cnn_train.flows import reports
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import ParameterError, RunParameters, validate_parameters
from cnn_train.flows.placement import check_satisfiable
from cnn_train.flows.tracking import RunTracker
from cnn_train.flows.train_flow import (
    ChildRun,
    ended,
    flow_run_tags,
    prep_task,
    recorded_flow,
    train_child_run,
)


def validate_backends(backends: list[str], values: dict[str, Any]) -> list[RunParameters]:
    if len(backends) < 2 or len(set(backends)) != len(backends):
        raise ParameterError(f"backends: give at least two different backend names, got {backends}")
    return [validate_parameters(**values, backend=name) for name in backends]


@flow(
    name="cnn-train-compare",
    description="Train one config on several backends with the same seed and split, and compare them.",
    **recorded_flow(),
)
def cnn_train_compare(
    backends: list[str] = ["keras", "torch"],  # noqa: B006 - Prefect needs a literal default for the form
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
    train_device: str = "gpu-preferred",
    evaluate_device: str = "gpu-preferred",
    tolerance_points: float = 1.0,
) -> dict[str, Any]:
    """Each backend trains and evaluates the same config on the same split; the report compares them.

    Args:
        epochs: Passes over the training set; empty for the architecture's default (10, or the
            recipe's 7 for cnn-improved).
        batch_size: Images per optimizer step; empty for the architecture's default (32, or 128).
        learning_rate: Adam learning rate (the peak of cnn-improved's one-cycle schedule); empty for
            the architecture's default (0.001, or 0.003).
    """
    values = {k: v for k, v in locals().items() if k not in ("backends", "tolerance_points")}
    per_backend = validate_backends(list(backends), values)
    check_satisfiable(per_backend[0].device_requests())
    logger = get_run_logger()
    parent = RunTracker.start(
        per_backend[0].experiment,
        run_name="compare-" + "-".join(backends),
        tags=flow_run_tags() | {"cnn_train.role": "compare"},
    )
    logger.info("MLflow parent run %s: %s", parent.run_id, parent.url)
    with ended(parent):
        parent.log_params(values | {"backends": ",".join(backends), "tolerance_points": tolerance_points})
        data = prep_task(per_backend[0], parent)
        children = {
            params.backend: train_child_run(
                params, data, parent, run_name=f"{params.backend}-{params.architecture}", role="compare-backend"
            )
            for params in per_backend
        }
        result = _report(
            parent, data, children, title=f"{architecture} on " + " against ".join(backends),
            tolerance_points=tolerance_points,
        )
    logger.info(result["verdict"])
    return result


def _report(
    parent: RunTracker, data: PreparedData, children: dict[str, ChildRun], *, title: str, tolerance_points: float
) -> dict[str, Any]:
    """The side-by-side table, confusion matrices and verdict, to MLflow and to Prefect."""
    rows = [child.row(name) for name, child in children.items()]
    confusions = {
        name: reports.classification_tables(
            data.y_test, child.evaluated.probabilities.argmax(axis=1), data.class_names
        ).confusion
        for name, child in children.items()
    }
    links = {"MLflow parent run": parent.url}
    if runtime.flow_run.ui_url:
        links["Prefect flow run"] = runtime.flow_run.ui_url
    out_dir = Path(tempfile.mkdtemp(prefix="cnn-train-compare-"))
    files = reports.write_comparison_report(
        rows, confusions, out_dir, title=title, class_names=data.class_names, tolerance_points=tolerance_points,
        links=links,
    )
    parent.log_artifacts(out_dir, "compare")
    accuracies = {row.name: row.test_accuracy for row in rows}
    parent.log_metrics(
        {f"{name}.test_accuracy": value for name, value in accuracies.items()}
        | {"accuracy_gap_points": reports.accuracy_gap_points(accuracies)}
    )
    markdown = files.report_md.read_text(encoding="utf-8")
    create_markdown_artifact(markdown, key="cnn-train-compare")
    table = reports.comparison_table(rows)
    create_table_artifact(table.round(4).to_dict(orient="records"), key="backend-comparison")
    return {
        "mlflow_run_id": parent.run_id,
        "mlflow_run_url": parent.url,
        "table": table.to_dict(orient="records"),
        "verdict": reports.parity_verdict(accuracies, tolerance_points),
        "report": markdown,
    }
