"""The ``cnn-train-predict`` flow: classify a folder of images with a registered or logged model, and
leave the predictions and their summary in an MLflow run tagged with the model, and in Prefect."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from cnn_train.flows import predict, tracking
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.params import ParameterError, PredictOptions
from cnn_train.flows.signatures import split_values
from cnn_train.flows.predict.figure import plot_examples
from cnn_train.flows.runs import cnn_train_flow, flow_run_tracker, run_links
from cnn_train.flows.tasks import IN_MEMORY
from cnn_train.flows.tracking import RunTracker

#: Where prediction runs go: beside, not among, the training runs they use.
PREDICT_EXPERIMENT = "cnn-train-predict"
#: Rows of the Prefect table artifact; the CSV in MLflow has every image.
_TABLE_ROWS = 200


def image_files(folder: str) -> list[Path]:
    """The image files under ``folder``, or the one image file it names (``~`` is the home folder; a
    relative path is read from where the flow runs); a missing path or a folder without images is a bad
    parameter."""
    path = Path(folder).expanduser()
    # A file is read as it is named, whatever its ending; a bad one is then named by the flow.
    collected = predict.collect_images([path])
    if collected.missing:
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()}, where this flow runs)"
        why = predict.not_taken(path)
        what = f"no file or folder {folder!r}{where}" if why == predict.NOTHING_THERE else f"{folder!r} is {why}"
        raise ParameterError(f"images: {what}; give a folder of PNG or JPEG files, or one of them")
    if not collected.files:
        raise ParameterError(f"images: no image files (PNG, JPEG, ...) in {folder!r}")
    return list(collected.files)


@task(name="load-model", task_run_name="load-model", **IN_MEMORY)
def load_model_task(spec: str | None) -> predict.LoadedModel:
    """The model named, or the default, loaded through MLflow's pyfunc API and checked."""
    model = predict.load_model(predict.choose_model(spec))
    get_run_logger().info("model: %s", model.choice.described)
    return model


@task(name="classify", task_run_name="classify", **IN_MEMORY)
def classify_task(model: predict.LoadedModel, files: list[Path]) -> predict.Predictions:
    """Every file as Fashion-MNIST would have it, classified; unreadable files are named, not fatal."""
    predictions = predict.classify(model, files)
    logger = get_run_logger()
    for failure in predictions.failures:
        logger.warning(failure.message)
    logger.info(predict.counted(len(predictions.table), len(predictions.failures)))
    return predictions


@task(name="record", task_run_name="record", **IN_MEMORY)
def record_task(tracker: RunTracker, model: predict.LoadedModel, predictions: predict.Predictions) -> predict.Summary:
    """The CSV, the summary, the model's inputs and a figure to MLflow; a table and the examples to Prefect."""
    summary = predict.summarize(predictions)
    described = model.choice.described
    with tempfile.TemporaryDirectory(prefix="cnn-train-predict-") as out:
        folder = Path(out)
        predict.write_outputs(predictions, summary, folder, model=described)
        if predictions.inputs:
            predict.write_model_inputs(predictions.inputs, folder / "inputs", predict.input_file_names(predictions.inputs))
            table = predictions.table
            plot_examples(predictions.inputs, list(table["predicted"]), list(table["probability"]), folder / "examples.png")
        tracker.log_artifacts(folder, "predictions")
    table = predictions.table
    tracker.log_metrics({
        "images_classified": len(table),
        "images_failed": len(predictions.failures),
        "low_confidence_images": len(summary.low_confidence),
        "mean_top_probability": float(table["probability"].mean()) if len(table) else 0.0,
    })
    tracker.describe(summary.headline(described))
    _publish_to_prefect(tracker, predictions, summary, described)
    return summary


def _publish_to_prefect(
    tracker: RunTracker, predictions: predict.Predictions, summary: predict.Summary, described: str
) -> None:
    """The predictions as a table; the summary with a figure of examples (served by an MLflow server) as markdown."""
    ranked = predict.top_k(predictions.probabilities(), 2)
    rows = [
        {"image": Path(image).name, "predicted": f"{first[0]} ({first[1]:.1%})", "runner-up": f"{second[0]} ({second[1]:.1%})"}
        for image, (first, second) in zip(predictions.table["image"], ranked, strict=True)
    ]
    if rows:
        create_table_artifact(rows[:_TABLE_ROWS], key="predictions", description=f"Predicted classes ({described})")
    markdown = summary.markdown(described)
    figure = tracking.artifact_url(tracker.uri, tracker.run_id, "predictions/examples.png") if rows else None
    if figure:
        create_image_artifact(figure, key="predicted-examples")
        markdown += f"\n## Examples\n\n![What the model saw, with its answer]({figure})\n"
    else:
        markdown += f"\nThe CSV, the summary and a figure of examples are in MLflow: {tracking.open_hint(tracker)}\n"
    create_markdown_artifact(markdown, key="prediction-summary", description="Class counts and low-confidence images")


class NothingClassifiedError(ExpectedFailure, ValueError):
    """Every image of a predict run failed: the flow run fails, as `cnn-train predict` exits 1."""


@cnn_train_flow("cnn-train-predict", PredictOptions)
def cnn_train_predict(**values: Any) -> dict[str, Any]:
    """Classify a folder of images (or one image) with a registered or logged model; the predictions and their
    summary go to MLflow."""
    _, options = split_values(values, PredictOptions)
    files = image_files(options.images)
    model = load_model_task(options.model)
    with flow_run_tracker(PREDICT_EXPERIMENT, run_name=f"predict-{Path(options.images).name}", role="predict") as tracker:
        tracker.set_tags(model.choice.tags())
        # An empty model (the default one) is no param, as a run's empty values are not; the tags name the model used.
        tracker.log_params({"model": options.model or None, "images": options.images, "image_files": len(files)})
        if model_id := getattr(model.pyfunc.metadata, "model_id", None):
            tracking.link_model_input(tracker.uri, tracker.run_id, model_id)
        predictions = classify_task(model, files)
        summary = record_task(tracker, model, predictions)
        if summary.failures and not summary.classified:  # recorded, and a failure: nothing came of the run
            raise NothingClassifiedError(
                f"none of the {len(summary.failures)} image file(s) could be classified ({summary.failures[0].message}"
                f"{'; ...' if len(summary.failures) > 1 else ''}); the list is in the MLflow run's predictions/summary.json"
            )
    return {
        "mlflow_run_id": tracker.run_id,
        **run_links(tracker),
        "model": model.choice.described,
        "model_uri": model.choice.model_uri,
        "classified": summary.classified,
        "failed": [failure.message for failure in summary.failures],
        "class_counts": summary.as_dict()["class_counts"],
    }
