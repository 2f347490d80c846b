"""Files a person wants to look at after a run: figures, per-class tables and ``report.md``.

Plain functions with no Prefect, MLflow or backend imports, so each piece can be called and
tested on its own; :func:`write_report` ties them together for the flow. Figures are drawn with
matplotlib's object API (``Figure`` + the Agg canvas) and never touch pyplot's global state,
so they need no display and can be drawn from several threads at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cnn_train.plugins.config import FASHION_MNIST_CLASSES, ModelConfig, TrainConfig
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainHistory

PER_CLASS_COLUMNS: tuple[str, ...] = ("class", "precision", "recall", "f1", "support")
EPOCH_COLUMNS: tuple[str, ...] = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "seconds",
    "images_per_second",
)
COMPARISON_COLUMNS: tuple[str, ...] = (
    "name",
    "test_accuracy",
    "parameters",
    "seconds_per_epoch",
    "images_per_second",
)
MISTAKE_COLOR = "#c62828"
DPI = 100

Formatter = Callable[[object], str]


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class ClassificationSummary:
    """Per-class precision/recall/F1, their averages, the confusion matrix and the accuracy."""

    per_class: pd.DataFrame
    averages: pd.DataFrame
    confusion: np.ndarray
    accuracy: float

    @property
    def confusion_normalised(self) -> np.ndarray:
        """Confusion matrix with each true-class row scaled to sum to 1."""
        return normalise_rows(self.confusion)

    def with_averages(self) -> pd.DataFrame:
        """The per-class rows followed by the macro and weighted average rows."""
        return pd.concat([self.per_class, self.averages], ignore_index=True)


def normalise_rows(counts: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; a row with no samples stays all zeros instead of NaN."""
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def classification_tables(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str] = FASHION_MNIST_CLASSES
) -> ClassificationSummary:
    """Per-class metrics (zero where undefined), macro and weighted averages, confusion counts, accuracy."""
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    n_classes = len(class_names)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {len(y_true)} and {len(y_pred)}")
    if y_true.size == 0:
        raise ValueError("y_true is empty: need at least one prediction to summarise")
    for what, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"{what} must lie in [0, {n_classes - 1}] to match {n_classes} class names, "
                f"got values from {labels.min()} to {labels.max()}"
            )
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = pd.DataFrame(
        {"class": list(class_names), "precision": precision, "recall": recall, "f1": f1, "support": support},
        columns=list(PER_CLASS_COLUMNS),
    )
    total = int(support.sum())
    averages = pd.DataFrame(
        [
            {
                "class": "macro avg",
                "precision": precision.mean(),
                "recall": recall.mean(),
                "f1": f1.mean(),
                "support": total,
            },
            {
                "class": "weighted avg",
                "precision": np.average(precision, weights=support),
                "recall": np.average(recall, weights=support),
                "f1": np.average(f1, weights=support),
                "support": total,
            },
        ]
    )
    return ClassificationSummary(
        per_class=per_class,
        averages=averages,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
        accuracy=float(np.mean(y_true == y_pred)),
    )


def _epochs_of(history: TrainHistory | Sequence[EpochMetrics]) -> tuple[EpochMetrics, ...]:
    epochs = tuple(history.epochs if isinstance(history, TrainHistory) else history)
    if not epochs:
        raise ValueError("history has no epochs: train for at least one epoch before reporting")
    return epochs


def history_frame(history: TrainHistory | Sequence[EpochMetrics]) -> pd.DataFrame:
    """One row per epoch with loss, accuracy, validation loss and accuracy, seconds and throughput."""
    return pd.DataFrame(
        [{column: getattr(epoch, column) for column in EPOCH_COLUMNS} for epoch in _epochs_of(history)],
        columns=list(EPOCH_COLUMNS),
    )


@dataclass(frozen=True)
class ComparisonRow:
    """One model or backend in a comparison; unknown figures stay ``None``."""

    name: str
    test_accuracy: float
    parameters: int | None = None
    seconds_per_epoch: float | None = None
    images_per_second: float | None = None


def comparison_table(rows: Sequence[ComparisonRow | Mapping[str, object]]) -> pd.DataFrame:
    """Rows as a DataFrame with columns name, test_accuracy, parameters, seconds_per_epoch, images_per_second."""
    records = []
    for row in rows:
        if isinstance(row, Mapping):
            unknown = set(row) - set(COMPARISON_COLUMNS)
            if unknown:
                raise ValueError(
                    f"comparison row has unknown keys {sorted(unknown)}; allowed: {', '.join(COMPARISON_COLUMNS)}"
                )
            row = ComparisonRow(**row)  # type: ignore[arg-type]
        records.append({column: getattr(row, column) for column in COMPARISON_COLUMNS})
    frame = pd.DataFrame(records, columns=list(COMPARISON_COLUMNS))
    frame["parameters"] = frame["parameters"].astype("Int64")
    for column in ("test_accuracy", "seconds_per_epoch", "images_per_second"):
        frame[column] = frame[column].astype(float)
    return frame


def accuracy_gap_points(accuracies: Mapping[str, float]) -> float:
    """Largest difference between two accuracies (fractions in [0, 1]), in percentage points."""
    if len(accuracies) < 2:
        raise ValueError(f"need at least two accuracies to compare, got {len(accuracies)}: {dict(accuracies)}")
    for name, value in accuracies.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy of {name!r} must be a fraction in [0, 1], got {value}")
    values = list(accuracies.values())
    # Rounded so that 0.912 - 0.902 counts as 1.0 point and not 1.0000000000000009.
    return round((max(values) - min(values)) * 100, 9)


def parity_verdict(accuracies: Mapping[str, float], tolerance_points: float = 1.0) -> str:
    """``"parity: max gap 0.40 points <= 1.0 (...)"`` or ``"no parity: max gap 2.10 points > 1.0 (...)"``."""
    gap = accuracy_gap_points(accuracies)
    listing = ", ".join(f"{name} {format_percent(value)}" for name, value in accuracies.items())
    if gap <= tolerance_points:
        return f"parity: max gap {gap:.2f} points <= {tolerance_points:g} ({listing})"
    return f"no parity: max gap {gap:.2f} points > {tolerance_points:g} ({listing})"


# --------------------------------------------------------------------------- formatting


def format_percent(fraction: float, decimals: int = 2) -> str:
    """``0.91234`` as ``"91.23%"``."""
    return f"{fraction * 100:.{decimals}f}%"


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _fmt(spec: str) -> Formatter:
    return lambda value: "n/a" if _is_missing(value) else format(value, spec)


def _fmt_percent(value: object) -> str:
    return "n/a" if _is_missing(value) else format_percent(float(value))  # type: ignore[arg-type]


def _cell(value: object) -> str:
    if _is_missing(value):
        return "n/a"
    return str(value).replace("|", r"\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, formats: Mapping[str, Formatter] | None = None) -> str:
    """A GitHub markdown table of ``frame``: underscores in headers become spaces, numbers align right,
    ``formats`` maps a column name to the formatter of its cells."""
    formats = formats or {}
    header = "| " + " | ".join(_cell(str(column).replace("_", " ")) for column in frame.columns) + " |"
    aligns = [
        "---:" if pd.api.types.is_numeric_dtype(frame[column]) else ":---" for column in frame.columns
    ]
    rule = "| " + " | ".join(aligns) + " |"
    lines = [header, rule]
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record, strict=True):
            formatter = formats.get(column)
            cells.append(_cell(formatter(value) if formatter else value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PER_CLASS_FORMATS: dict[str, Formatter] = {
    "precision": _fmt(".3f"),
    "recall": _fmt(".3f"),
    "f1": _fmt(".3f"),
    "support": _fmt(",d"),
}
EPOCH_FORMATS: dict[str, Formatter] = {
    "loss": _fmt(".4f"),
    "accuracy": _fmt_percent,
    "val_loss": _fmt(".4f"),
    "val_accuracy": _fmt_percent,
    "seconds": _fmt(".1f"),
    "images_per_second": _fmt(",.0f"),
}
COMPARISON_FORMATS: dict[str, Formatter] = {
    "test_accuracy": _fmt_percent,
    "parameters": _fmt(",d"),
    "seconds_per_epoch": _fmt(".1f"),
    "images_per_second": _fmt(",.0f"),
}


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


def _grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    columns = max(1, min(count, max_columns))
    return math.ceil(count / columns), columns


def _as_picture(image: np.ndarray) -> np.ndarray:
    """An image as imshow wants it: (h, w) for one channel, (h, w, 3) for RGB."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        return image[..., 0]
    return image


def _bare(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_learning_curves(history: TrainHistory | Sequence[EpochMetrics], path: Path | str) -> Path:
    """Loss and accuracy per epoch, training against validation, side by side."""
    frame = history_frame(history)
    figure = _new_figure(11, 4.2)
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    marker = "o" if len(frame) <= 30 else None
    for ax, metric, label in ((loss_ax, "loss", "Loss"), (accuracy_ax, "accuracy", "Accuracy")):
        ax.plot(frame["epoch"], frame[metric], marker=marker, label=f"train {metric}")
        ax.plot(frame["epoch"], frame[f"val_{metric}"], marker=marker, label=f"val {metric}")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    accuracy_ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    figure.suptitle("Learning curves")
    return _save(figure, path)


def _draw_matrix(ax: Axes, values: np.ndarray, class_names: Sequence[str], title: str, text: Formatter) -> None:
    image = ax.imshow(values, cmap="Blues", vmin=0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = values.max() / 2 if values.size and values.max() > 0 else np.inf
    fontsize = 9 if len(class_names) <= 10 else 7
    for (row, column), value in np.ndenumerate(values):
        ax.text(
            column,
            row,
            text(value),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if value > threshold else "black",
        )
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot_confusion_matrix(counts: np.ndarray, class_names: Sequence[str], path: Path | str) -> Path:
    """Confusion matrix as counts and as row-normalised rates, with class names on both axes."""
    counts = np.asarray(counts)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"counts must be square with one row per class ({len(class_names)}x{len(class_names)}), "
            f"got shape {counts.shape}"
        )
    figure = _new_figure(17, 7.5)
    count_ax, rate_ax = figure.subplots(1, 2)
    _draw_matrix(count_ax, counts, class_names, "Counts", lambda value: f"{int(value)}")
    _draw_matrix(
        rate_ax, normalise_rows(counts), class_names, "Share of each true class", lambda value: f"{value:.2f}"
    )
    figure.suptitle(f"Confusion matrix ({int(counts.sum()):,} images)")
    return _save(figure, path)


def prediction_title(predicted: str, confidence: float, true: str, true_probability: float | None = None) -> str:
    """``"Sneaker (97%)\\ntrue: Sandal"``; with ``true_probability`` the true class gets its percentage too."""
    truth = f"true: {true}" if true_probability is None else f"true: {true} ({true_probability:.0%})"
    return f"{predicted} ({confidence:.0%})\n{truth}"


def _check_predictions(
    images: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> None:
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (n, height, width[, channels]), got shape {images.shape}")
    if not len(images) == len(y_true) == len(probabilities):
        raise ValueError(
            "images, y_true and probabilities must have the same length, "
            f"got {len(images)}, {len(y_true)} and {len(probabilities)}"
        )
    if probabilities.ndim != 2 or probabilities.shape[1] != len(class_names):
        raise ValueError(
            f"probabilities must be (n, {len(class_names)}) to match the class names, "
            f"got shape {probabilities.shape}"
        )


def _draw_prediction_grid(
    figure: Figure,
    indices: np.ndarray,
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    columns: int,
    show_true_probability: bool,
) -> None:
    rows, columns = _grid_shape(len(indices), columns)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    predicted = probabilities.argmax(axis=1)
    for ax, index in zip(axes, indices, strict=False):
        pred, true = int(predicted[index]), int(y_true[index])
        wrong = pred != true
        ax.imshow(_as_picture(images[index]), cmap="binary", vmin=0, vmax=1)
        title = prediction_title(
            class_names[pred],
            float(probabilities[index, pred]),
            class_names[true],
            float(probabilities[index, true]) if show_true_probability else None,
        )
        ax.set_title(title, fontsize=9, color=MISTAKE_COLOR if wrong else "black")
        _bare(ax)
        if wrong:
            for spine in ax.spines.values():
                spine.set_edgecolor(MISTAKE_COLOR)
                spine.set_linewidth(2.5)
    for ax in axes[len(indices) :]:
        ax.set_visible(False)


def plot_predictions_grid(
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    *,
    n: int = 25,
) -> Path:
    """The first ``n`` images titled with prediction, confidence and truth; mistakes framed in red."""
    images, y_true, probabilities = np.asarray(images), np.asarray(y_true), np.asarray(probabilities)
    _check_predictions(images, y_true, probabilities, class_names)
    indices = np.arange(min(n, len(images)))
    if indices.size == 0:
        raise ValueError("no images to plot: pass at least one image and n >= 1")
    rows, columns = _grid_shape(len(indices), 5)
    figure = _new_figure(2.3 * columns, 2.5 * rows + 0.6)
    _draw_prediction_grid(
        figure, indices, images, y_true, probabilities, class_names, columns=columns, show_true_probability=False
    )
    correct = int((probabilities[indices].argmax(axis=1) == y_true[indices]).sum())
    figure.suptitle(f"Predictions: {correct} of {len(indices)} right (mistakes in red)")
    return _save(figure, path)


def confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` misclassified samples with the highest predicted-class probability, surest first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def plot_confident_mistakes(
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    *,
    n: int = 16,
) -> Path:
    """The ``n`` mistakes the model was surest of, or a figure saying there were none."""
    images, y_true, probabilities = np.asarray(images), np.asarray(y_true), np.asarray(probabilities)
    _check_predictions(images, y_true, probabilities, class_names)
    indices = confident_mistakes(y_true, probabilities, n)
    if indices.size == 0:
        figure = _new_figure(6, 3.5)
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, f"No mistakes among {len(images):,} images", ha="center", va="center", fontsize=16)
        ax.set_axis_off()
        figure.suptitle("Most confident mistakes")
        return _save(figure, path)
    rows, columns = _grid_shape(len(indices), 4)
    figure = _new_figure(max(2.6 * columns, 6), 2.6 * rows + 0.6)
    _draw_prediction_grid(
        figure, indices, images, y_true, probabilities, class_names, columns=columns, show_true_probability=True
    )
    total = int((probabilities.argmax(axis=1) != y_true).sum())
    figure.suptitle(f"Most confident mistakes ({len(indices)} of {total:,})")
    return _save(figure, path)


def plot_kernels(kernels: np.ndarray, path: Path | str, *, title: str = "First convolution kernels") -> Path:
    """Every filter of a ``(kernel_h, kernel_w, in_channels, filters)`` kernel on one zero-centred colour scale."""
    kernels = np.asarray(kernels, dtype=float)
    if kernels.ndim != 4:
        raise ValueError(f"kernels must be (kernel_h, kernel_w, in_channels, filters), got shape {kernels.shape}")
    in_channels, filters = kernels.shape[2], kernels.shape[3]
    # Averaging over input channels keeps one square per filter for RGB or deeper inputs.
    shown = kernels.mean(axis=2)
    if in_channels > 1:
        title = f"{title} (mean over {in_channels} input channels)"
    rows, columns = _grid_shape(filters, 8)
    figure = _new_figure(max(1.3 * columns + 1.2, 6), max(1.4 * rows + 0.8, 3))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    limit = float(np.abs(shown).max()) or 1.0
    image = None
    for index, ax in enumerate(axes):
        if index >= filters:
            ax.set_visible(False)
            continue
        image = ax.imshow(shown[:, :, index], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"#{index + 1}", fontsize=8)
        _bare(ax)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="weight")
    figure.suptitle(f"{title}: {filters} filters of {kernels.shape[0]}x{kernels.shape[1]}")
    return _save(figure, path)


def feature_map_title(name: str, shape: Sequence[int]) -> str:
    """``"conv1 28x28x32"`` for a map of shape (28, 28, 32) or (1, 28, 28, 32)."""
    return f"{name} {'x'.join(str(side) for side in _single_map_shape(name, shape))}"


def _single_map_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"feature map {name!r} must be (height, width, channels) or (1, h, w, c), got {shape}")
    return shape


def plot_feature_maps(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: Path | str,
    *,
    max_channels: int = 16,
) -> Path:
    """The input image beside, for each layer in the given order, a grid of its first ``max_channels`` channels."""
    if not maps:
        raise ValueError("maps is empty: pass at least one layer's activations (e.g. conv1)")
    layers = {
        name: np.asarray(values).reshape(_single_map_shape(name, np.shape(values))) for name, values in maps.items()
    }
    columns = min(8, max_channels)
    grid_rows = {
        name: _grid_shape(min(max_channels, values.shape[2]), columns)[0] for name, values in layers.items()
    }
    figure = _new_figure(3.2 + 1.25 * columns, sum(1.25 * rows + 0.5 for rows in grid_rows.values()))
    input_figure, layers_figure = figure.subfigures(1, 2, width_ratios=[3.2, 1.25 * columns])
    input_ax = input_figure.subplots()
    input_ax.imshow(_as_picture(image), cmap="binary")
    input_ax.set_title(f"input {'x'.join(str(side) for side in np.shape(image))}")
    _bare(input_ax)
    layer_figures = np.atleast_1d(
        layers_figure.subfigures(len(layers), 1, height_ratios=[1.25 * r + 0.5 for r in grid_rows.values()])
    )
    for sub, (name, values) in zip(layer_figures, layers.items(), strict=True):
        channels = values.shape[2]
        shown = min(max_channels, channels)
        axes = np.atleast_1d(sub.subplots(grid_rows[name], columns)).ravel()
        for index, ax in enumerate(axes):
            if index >= shown:
                ax.set_visible(False)
                continue
            ax.imshow(values[:, :, index], cmap="viridis")
            _bare(ax)
        note = f" (first {shown} of {channels} channels)" if shown < channels else ""
        sub.suptitle(feature_map_title(name, values.shape) + note, fontsize=11)
    figure.suptitle("Feature maps", fontsize=13)
    return _save(figure, path)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportInputs:
    """What the flow knows about a finished run; everything :func:`render_report_markdown` prints."""

    backend: str
    model_config: ModelConfig
    train_config: TrainConfig
    history: TrainHistory
    test: Evaluation
    device: str | None = None
    run_name: str | None = None
    parameter_count: int | None = None
    mlflow_run_url: str | None = None
    prefect_flow_run_url: str | None = None
    #: The previous lesson's dense network, to state the CNN's gain over it.
    dense_baseline: ComparisonRow | None = None
    #: The same architecture trained by other backends (this run's row is added automatically).
    other_backends: tuple[ComparisonRow, ...] = ()
    parity_tolerance_points: float = 1.0
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    extra_params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dense_baseline is not None and self.model_config.architecture != "cnn":
            raise ValueError(
                f"dense_baseline compares a CNN with the dense network, but this run's architecture is "
                f"{self.model_config.architecture!r}; leave dense_baseline unset"
            )
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

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall-clock seconds of the recorded epochs."""
        return float(np.mean([epoch.seconds for epoch in self.history.epochs]))

    @property
    def images_per_second(self) -> float:
        """Mean training throughput of the recorded epochs."""
        return float(np.mean([epoch.images_per_second for epoch in self.history.epochs]))

    def as_comparison_row(self, name: str | None = None) -> ComparisonRow:
        """This run as one row of a comparison table."""
        return ComparisonRow(
            name=name or f"{self.model_config.architecture} ({self.backend})",
            test_accuracy=self.test.accuracy,
            parameters=self.parameters,
            seconds_per_epoch=self.seconds_per_epoch,
            images_per_second=self.images_per_second,
        )


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
        return tuple(path for path in vars(self).values() if path is not None)


@dataclass(frozen=True)
class ReportFiles:
    """Everything :func:`write_report` wrote."""

    report_md: Path
    per_class_csv: Path
    epochs_csv: Path
    figures: FigureFiles

    def paths(self) -> tuple[Path, ...]:
        """Every file written, report first, e.g. to log them all as artifacts."""
        return (self.report_md, self.per_class_csv, self.epochs_csv, *self.figures.paths())


def cnn_against_dense_sentence(cnn: ComparisonRow, dense: ComparisonRow) -> str:
    """``"The CNN reaches 91.20% against 88.40% for the dense network: +2.80 points."`` plus the parameter cost."""
    gap = (cnn.test_accuracy - dense.test_accuracy) * 100
    sentence = (
        f"The CNN reaches {format_percent(cnn.test_accuracy)} against {format_percent(dense.test_accuracy)} "
        f"for the dense network: {gap:+.2f} points"
    )
    if cnn.parameters is not None and dense.parameters is not None:
        sentence += f", with {cnn.parameters:,} parameters against {dense.parameters:,}"
    return sentence + "."


def _key_value_table(pairs: Sequence[tuple[str, object]], header: tuple[str, str]) -> str:
    return markdown_table(pd.DataFrame([(key, str(value)) for key, value in pairs], columns=list(header)))


def _key_params(inputs: ReportInputs) -> list[tuple[str, object]]:
    model, train = inputs.model_config, inputs.train_config
    pairs: list[tuple[str, object]] = [("backend", inputs.backend), ("architecture", model.architecture)]
    if inputs.device:
        pairs.append(("device", inputs.device))
    if model.conv_layers:
        blocks = ", ".join(
            f"{block.filters}@{block.kernel_size}x{block.kernel_size}"
            + (f" + pool {block.pool_size}" if block.pool_size else "")
            for block in model.conv_layers
        )
        pairs.append(("conv blocks", blocks))
    pairs += [
        ("dense units", model.dense_units),
        ("input shape", "x".join(map(str, model.input_shape))),
        ("epochs", train.epochs),
        ("batch size", train.batch_size),
        ("learning rate", f"{train.learning_rate:g}"),
        ("seed", train.seed),
    ]
    pairs += list(inputs.extra_params.items())
    return pairs


def _figure_link(caption: str, path: Path | None) -> list[str]:
    return [f"![{caption}]({Path(path).name})", ""] if path is not None else []


def render_report_markdown(
    inputs: ReportInputs, summary: ClassificationSummary, figures: FigureFiles | None = None
) -> str:
    """``report.md``: key metrics and parameters, comparisons, per-class and per-epoch tables, figure links.

    Figures are linked by file name, so they must sit beside ``report.md``.
    """
    figures = figures or FigureFiles()
    lines = [f"# Fashion-MNIST {inputs.architecture_label}, {inputs.backend} backend", ""]
    if inputs.run_name:
        lines += [f"Run `{inputs.run_name}`.", ""]
    links = [
        f"[{label}]({url})"
        for label, url in (("MLflow run", inputs.mlflow_run_url), ("Prefect flow run", inputs.prefect_flow_run_url))
        if url
    ]
    if links:
        lines += [" · ".join(links), ""]

    metrics = [
        ("test accuracy", f"{format_percent(inputs.test.accuracy)} ({inputs.test.accuracy:.4f})"),
        ("test loss", f"{inputs.test.loss:.4f}"),
        ("epochs", len(inputs.history.epochs)),
        ("final val accuracy", format_percent(inputs.history.final.val_accuracy)),
        ("seconds per epoch", f"{inputs.seconds_per_epoch:.1f}"),
        ("images per second", f"{inputs.images_per_second:,.0f}"),
        ("trainable parameters", f"{inputs.parameters:,}"),
    ]
    lines += ["## Key metrics", "", _key_value_table(metrics, ("metric", "value")), ""]
    lines += ["## Parameters", "", _key_value_table(_key_params(inputs), ("parameter", "value")), ""]

    if inputs.dense_baseline is not None:
        cnn = inputs.as_comparison_row(f"CNN ({inputs.backend})")
        lines += [
            "## CNN against dense network",
            "",
            cnn_against_dense_sentence(cnn, inputs.dense_baseline),
            "",
            markdown_table(comparison_table([cnn, inputs.dense_baseline]), COMPARISON_FORMATS),
            "",
        ]
    if inputs.other_backends:
        rows = [inputs.as_comparison_row(inputs.backend), *inputs.other_backends]
        verdict = parity_verdict(
            {row.name: row.test_accuracy for row in rows}, tolerance_points=inputs.parity_tolerance_points
        )
        lines += [
            "## Backend against backend",
            "",
            markdown_table(comparison_table(rows), COMPARISON_FORMATS),
            "",
            f"Verdict: {verdict}.",
            "",
        ]

    lines += [
        "## Per class",
        "",
        f"Accuracy over {int(summary.confusion.sum()):,} test images: {format_percent(summary.accuracy)}.",
        "",
        markdown_table(summary.with_averages(), PER_CLASS_FORMATS),
        "",
    ]
    lines += _figure_link("Confusion matrix", figures.confusion_matrix)
    lines += ["## Training", ""]
    lines += _figure_link("Learning curves", figures.learning_curves)
    lines += [markdown_table(history_frame(inputs.history), EPOCH_FORMATS), ""]
    if figures.predictions or figures.confident_mistakes:
        lines += ["## Predictions", ""]
        lines += _figure_link("Predictions on test images", figures.predictions)
        lines += _figure_link("Most confident mistakes", figures.confident_mistakes)
    if figures.kernels or figures.feature_maps:
        lines += ["## What the network learned", ""]
        lines += _figure_link("First convolution kernels", figures.kernels)
        lines += _figure_link("Feature maps", figures.feature_maps)
    return "\n".join(lines).rstrip() + "\n"


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
    images, y_true, probabilities = np.asarray(images), np.asarray(y_true), np.asarray(probabilities)
    names = inputs.class_names
    _check_predictions(images, y_true, probabilities, names)
    summary = classification_tables(y_true, probabilities.argmax(axis=1), names)

    figures = FigureFiles(
        learning_curves=plot_learning_curves(inputs.history, out_dir / "learning_curves.png"),
        confusion_matrix=plot_confusion_matrix(summary.confusion, names, out_dir / "confusion_matrix.png"),
        predictions=plot_predictions_grid(
            images, y_true, probabilities, names, out_dir / "predictions.png", n=grid_size
        ),
        confident_mistakes=plot_confident_mistakes(
            images, y_true, probabilities, names, out_dir / "confident_mistakes.png", n=mistakes
        ),
        kernels=plot_kernels(kernels, out_dir / "kernels.png") if kernels is not None else None,
        feature_maps=(
            plot_feature_maps(images[feature_map_image_index], feature_maps, out_dir / "feature_maps.png")
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


@dataclass(frozen=True)
class ComparisonFiles:
    """What :func:`write_comparison_report` wrote."""

    report_md: Path
    table_csv: Path
    confusion_matrices: tuple[Path, ...]

    def paths(self) -> tuple[Path, ...]:
        return (self.report_md, self.table_csv, *self.confusion_matrices)


def write_comparison_report(
    rows: Sequence[ComparisonRow],
    confusions: Mapping[str, np.ndarray],
    out_dir: Path | str,
    *,
    title: str,
    class_names: Sequence[str] = FASHION_MNIST_CLASSES,
    tolerance_points: float = 1.0,
    links: Mapping[str, str] | None = None,
) -> ComparisonFiles:
    """``compare.md``, ``comparison.csv`` and one confusion-matrix PNG per row, side by side by backend."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(rows)
    table_csv = out_dir / "comparison.csv"
    table.to_csv(table_csv, index=False)
    verdict = parity_verdict({row.name: row.test_accuracy for row in rows}, tolerance_points)
    pictures = tuple(
        plot_confusion_matrix(confusions[row.name], class_names, out_dir / f"confusion_matrix_{row.name}.png")
        for row in rows
    )
    lines = [f"# {title}", ""]
    if links:
        lines += [" · ".join(f"[{label}]({url})" for label, url in links.items()), ""]
    lines += [markdown_table(table, COMPARISON_FORMATS), "", f"**Verdict**: {verdict}", ""]
    for row, picture in zip(rows, pictures, strict=True):
        lines += [f"## {row.name}", "", f"![Confusion matrix, {row.name}]({picture.name})", ""]
    report_md = out_dir / "compare.md"
    report_md.write_text("\n".join(lines), encoding="utf-8")
    return ComparisonFiles(report_md, table_csv, pictures)


_FIGURE_LINK = re.compile(r"(!\[[^\]]*\]\()([\w.-]+\.png)(\))")


def relink_figures(markdown: str, url_for: Callable[[str], str]) -> str:
    """``report.md`` with each figure's file name replaced by ``url_for(name)``, for viewers (the
    Prefect UI) that do not have the files beside the document."""
    return _FIGURE_LINK.sub(lambda m: f"{m.group(1)}{url_for(m.group(2))}{m.group(3)}", markdown)
