"""Charts of a run: learning curves and the confusion matrix.

Drawn with matplotlib's object API on an Agg canvas, never pyplot's global state, so they need
no display and can be drawn from several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import PercentFormatter

from cnn_train.flows.reporting.canvas import new_figure, save
from cnn_train.flows.reporting.tables import ClassificationSummary, history_frame
from cnn_train.plugins.contract import EpochMetrics, TrainHistory


def plot_learning_curves(history: TrainHistory | Sequence[EpochMetrics], path: Path | str) -> Path:
    """Loss and accuracy per epoch, training against validation, side by side."""
    frame = history_frame(history)
    figure = new_figure(11, 4.2)
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    marker = "o" if len(frame) <= 30 else None
    for ax, metric, label in ((loss_ax, "loss", "Loss"), (accuracy_ax, "accuracy", "Accuracy")):
        ax.plot(frame["epoch"], frame[metric], marker=marker, label=f"train {metric}")
        ax.plot(frame["epoch"], frame[f"val_{metric}"], marker=marker, label=f"val {metric}")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        label_epochs(ax, frame["epoch"].tolist())
        ax.grid(alpha=0.3)
        ax.legend()
    # As many decimals as the ticks need: whole percents labelled ticks 2.5 points apart 52%, 55%, 57%.
    accuracy_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    figure.suptitle("Learning curves")
    return save(figure, path)


def label_epochs(ax: Axes, epochs: Sequence[int]) -> None:
    """Whole epochs on the x axis: each one when they are few (one epoch was drawn at 0.96 to 1.04)."""
    if len(epochs) <= 15:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _draw_matrix(
    ax: Axes, values: np.ndarray, class_names: Sequence[str], title: str, text: Callable[[float], str]
) -> None:
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


def plot_confusion_matrix(summary: ClassificationSummary, path: Path | str, *, whose: str | None = None) -> Path:
    """Confusion matrix as counts and as row-normalised rates, with class names on both axes; ``whose``
    (a backend's name) heads the title, so the picture says whose it is once downloaded on its own."""
    figure = new_figure(17, 7.5)
    count_ax, rate_ax = figure.subplots(1, 2)
    names = summary.class_names
    _draw_matrix(count_ax, summary.confusion, names, "Counts", lambda value: f"{int(value)}")
    _draw_matrix(rate_ax, summary.confusion_rates, names, "Share of each true class", lambda value: f"{value:.2f}")
    figure.suptitle(f"{whose + ': ' if whose else ''}Confusion matrix ({int(summary.confusion.sum()):,} images)")
    return save(figure, path)
