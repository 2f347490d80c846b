"""A finished run's ``report.md``, its CSV tables and figures, written side by side in one folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from cnn_train.flows.reporting.comparison import ComparisonRow, cnn_against_dense_sentence, comparison_table
from cnn_train.flows.reporting.figures import plot_confusion_matrix, plot_learning_curves
from cnn_train.flows.reporting.grids import (
    Predictions,
    plot_confident_mistakes,
    plot_feature_maps,
    plot_kernels,
    plot_predictions_grid,
)
from cnn_train.flows.reporting.markdown import (
    check_web_url,
    figure_link,
    format_percent,
    key_value_table,
    link_line,
    markdown_table,
)
from cnn_train.flows.reporting.tables import ClassificationSummary, classification_tables, history_frame
from cnn_train.plugins.config import FASHION_MNIST_CLASSES, ModelConfig, TrainConfig
from cnn_train.plugins.contract import Evaluation, TrainHistory


@dataclass(frozen=True)
class ReportInputs:
    """What the flow knows about a finished run; everything :func:`render_report_markdown` prints."""

    backend: str
    model_config: ModelConfig
    train_config: TrainConfig
    history: TrainHistory
    test: Evaluation
    run_name: str | None = None
    parameter_count: int | None = None
    #: The run's page in the MLflow UI; None when there is no MLflow server (a local store).
    mlflow_run_url: str | None = None
    #: How to open the run, printed when ``mlflow_run_url`` is None
    #: (e.g. "run `cnn-train up` and open http://127.0.0.1:5000").
    mlflow_open_hint: str | None = None
    #: The flow run's page in the Prefect UI; None when there is no UI to link to.
    prefect_flow_run_url: str | None = None
    #: The previous lesson's dense network, to state the CNN's gain over it.
    dense_baseline: ComparisonRow | None = None
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    #: Images per split ("train", "validation", "test"), when the run knows them: runs on a sample read apart.
    images: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        check_web_url("mlflow_run_url", self.mlflow_run_url)
        check_web_url("prefect_flow_run_url", self.prefect_flow_run_url)
        if self.dense_baseline is not None and self.model_config.architecture == "dense":
            raise ValueError("dense_baseline compares a CNN with the dense network, but this run's network is the dense one; "
                             "leave dense_baseline unset")
        if len(self.class_names) != self.model_config.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but the model has "
                f"{self.model_config.num_classes} classes"
            )

    @property
    def architecture_label(self) -> str:
        """``"CNN"`` or ``"dense network"``."""
        return "CNN" if self.model_config.architecture == "cnn" else f"{self.model_config.architecture} network"

    @property
    def parameters(self) -> int:
        """Trainable parameters: the backend's count when given, else the config's."""
        return self.parameter_count if self.parameter_count is not None else self.model_config.parameter_count()

    def as_comparison_row(self, name: str) -> ComparisonRow:
        """This run as the row ``name`` of a comparison table."""
        return ComparisonRow.of(name, self.history, self.test.accuracy, self.parameters)


@dataclass(frozen=True)
class FigureFiles:
    """PNG files drawn for a report; ``None`` for a figure that was not drawn."""

    learning_curves: Path | None = None
    confusion_matrix: Path | None = None
    predictions: Path | None = None
    confident_mistakes: Path | None = None
    kernels: Path | None = None
    feature_maps: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        """The figures that were drawn."""
        drawn = (getattr(self, figure.name) for figure in fields(self))
        return tuple(path for path in drawn if path is not None)


@dataclass(frozen=True)
class ReportFiles:
    """Everything :func:`write_report` wrote."""

    report_md: Path
    per_class_csv: Path
    epochs_csv: Path
    figures: FigureFiles


def _key_params(inputs: ReportInputs) -> list[tuple[str, object]]:
    model, train = inputs.model_config, inputs.train_config
    pairs: list[tuple[str, object]] = [("backend", inputs.backend), ("architecture", model.architecture)]
    if model.conv_layers:
        blocks = ", ".join(
            f"{block.filters}@{block.kernel_size}x{block.kernel_size}"
            + (f" + pool {block.pool_size}" if block.pool_size else "")
            for block in model.conv_layers
        )
        pairs.append(("conv blocks", blocks))
    return pairs + [
        ("dense units", model.dense_units),
        ("input shape", "x".join(map(str, model.input_shape))),
        ("epochs", train.epochs),
        ("batch size", train.batch_size),
        ("learning rate", f"{train.learning_rate:g}"),
        ("seed", train.seed),
        *((f"{split} images", f"{count:,}") for split, count in (inputs.images or {}).items()),
    ]


def _where_to_look(inputs: ReportInputs) -> list[str]:
    """Links to the MLflow and Prefect runs that exist, and how to open the MLflow run when it has no link."""
    lines = link_line({"MLflow run": inputs.mlflow_run_url, "Prefect flow run": inputs.prefect_flow_run_url})
    if inputs.mlflow_run_url is None and inputs.mlflow_open_hint:
        lines += [f"MLflow run: {inputs.mlflow_open_hint}", ""]
    return lines


def _key_metrics(inputs: ReportInputs) -> list[tuple[str, object]]:
    history = inputs.history
    return [
        ("test accuracy", f"{format_percent(inputs.test.accuracy)} ({inputs.test.accuracy:.4f})"),
        ("test loss", f"{inputs.test.loss:.4f}"),
        ("epochs", len(history.epochs)),
        ("final val accuracy", format_percent(history.final.val_accuracy)),
        # Of how many epochs: a median of one or two still holds the first epoch's warm-up.
        (f"seconds per epoch, validation included (median of {len(history.epochs)})", f"{history.seconds_per_epoch:.1f}"),
        (f"training images per second (median of {len(history.epochs)})", f"{history.images_per_second:,.0f}"),
        ("trainable parameters", f"{inputs.parameters:,}"),
    ]


def render_report_markdown(
    inputs: ReportInputs, summary: ClassificationSummary, figures: FigureFiles | None = None
) -> str:
    """``report.md``: key metrics and parameters, the CNN against dense, per-class and per-epoch tables, figures.

    Figures are linked by file name, so they must sit beside ``report.md``.
    """
    figures = figures or FigureFiles()
    lines = [f"# Fashion-MNIST {inputs.architecture_label}, {inputs.backend} backend", ""]
    if inputs.run_name:
        lines += [f"Run `{inputs.run_name}`.", ""]
    lines += _where_to_look(inputs)
    lines += ["## Key metrics", "", key_value_table(_key_metrics(inputs), ("metric", "value")), ""]
    lines += ["## Parameters", "", key_value_table(_key_params(inputs), ("parameter", "value")), ""]
    if inputs.dense_baseline is not None:
        cnn = inputs.as_comparison_row(f"CNN ({inputs.backend})")
        lines += [
            "## CNN against dense network",
            "",
            cnn_against_dense_sentence(cnn, inputs.dense_baseline),
            "",
            markdown_table(comparison_table([cnn, inputs.dense_baseline])),
            "",
        ]
    lines += [
        "## Per class",
        "",
        f"Accuracy over {int(summary.confusion.sum()):,} test images: {format_percent(summary.accuracy)}.",
        "",
        markdown_table(summary.with_averages()),
        "",
    ]
    lines += figure_link("Confusion matrix", figures.confusion_matrix)
    lines += ["## Training", ""]
    lines += figure_link("Learning curves", figures.learning_curves)
    lines += [markdown_table(history_frame(inputs.history)), ""]
    if figures.predictions or figures.confident_mistakes:
        lines += ["## Predictions", ""]
        lines += figure_link("Predictions on test images", figures.predictions)
        lines += figure_link("Most confident mistakes", figures.confident_mistakes)
    if figures.kernels or figures.feature_maps:
        lines += ["## What the network learned", ""]
        lines += figure_link("First convolution kernels", figures.kernels)
        lines += figure_link("Feature maps", figures.feature_maps)
    return "\n".join(lines).rstrip() + "\n"


def run_description(inputs: ReportInputs) -> str:
    """A few markdown lines for the top of the run's MLflow page (its description): the test accuracy, the
    CNN against the dense network when it was trained, and where the whole report is."""
    epochs = len(inputs.history.epochs)
    sizes = f" on {inputs.images['train']:,} training images, tested on {inputs.images['test']:,}" if inputs.images else ""
    lines = [
        f"**Test accuracy {format_percent(inputs.test.accuracy)}**: Fashion-MNIST {inputs.architecture_label}, "
        f"{inputs.backend} backend, {epochs} epoch{'s' if epochs != 1 else ''} at batch {inputs.train_config.batch_size}"
        f"{sizes}.",
    ]
    if inputs.dense_baseline is not None:
        lines += ["", cnn_against_dense_sentence(inputs.as_comparison_row("CNN"), inputs.dense_baseline)]
    lines += ["", "The whole report, with tables and figures: `report/report.md` in Artifacts.", ""]
    lines += link_line({"Prefect flow run": inputs.prefect_flow_run_url})
    return "\n".join(lines).rstrip()


def write_report(
    inputs: ReportInputs,
    out_dir: Path | str,
    *,
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    kernels: np.ndarray | None = None,
    feature_maps: Mapping[str, np.ndarray] | None = None,
    feature_map_image_index: int = 0,
    grid_size: int = 25,
    mistakes: int = 16,
) -> ReportFiles:
    """Draw every figure, write ``per_class.csv``, ``epochs.csv`` and ``report.md`` into ``out_dir``.

    ``feature_maps`` are the activations of ``images[feature_map_image_index]``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = inputs.class_names
    predictions = Predictions(images, y_true, probabilities, names)
    summary = classification_tables(predictions.y_true, predictions.predicted, names)

    figures = FigureFiles(
        learning_curves=plot_learning_curves(inputs.history, out_dir / "learning_curves.png"),
        confusion_matrix=plot_confusion_matrix(summary, out_dir / "confusion_matrix.png"),
        predictions=plot_predictions_grid(predictions, out_dir / "predictions.png", n=grid_size),
        confident_mistakes=plot_confident_mistakes(predictions, out_dir / "confident_mistakes.png", n=mistakes),
        kernels=plot_kernels(kernels, out_dir / "kernels.png") if kernels is not None else None,
        feature_maps=(
            plot_feature_maps(predictions.images[feature_map_image_index], feature_maps, out_dir / "feature_maps.png")
            if feature_maps
            else None
        ),
    )
    per_class_csv = out_dir / "per_class.csv"
    summary.per_class.to_csv(per_class_csv, index=False)
    epochs_csv = out_dir / "epochs.csv"
    history_frame(inputs.history).to_csv(epochs_csv, index=False)
    report_md = out_dir / "report.md"
    report_md.write_text(render_report_markdown(inputs, summary, figures), encoding="utf-8")
    return ReportFiles(report_md=report_md, per_class_csv=per_class_csv, epochs_csv=epochs_csv, figures=figures)
