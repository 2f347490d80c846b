"""Metric tables of a run: per-class precision/recall/F1 and the confusion matrix (scikit-learn),
and one row per training epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from cnn_train.plugins.contract import EpochMetrics, TrainHistory

PER_CLASS_COLUMNS: tuple[str, ...] = ("class", "precision", "recall", "f1", "support")
_AVERAGES: tuple[str, ...] = ("macro avg", "weighted avg")
EPOCH_COLUMNS: tuple[str, ...] = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "seconds",
    "images_per_second",
)


@dataclass(frozen=True, eq=False)
class ClassificationSummary:
    """Per-class precision/recall/F1, their averages, the confusion matrix and the accuracy."""

    class_names: tuple[str, ...]
    per_class: pd.DataFrame
    averages: pd.DataFrame
    #: Counts: row ``i`` holds the images of true class ``i`` by predicted class.
    confusion: np.ndarray
    #: ``confusion`` with each true-class row scaled to sum to 1 (all zeros for an absent class).
    confusion_rates: np.ndarray
    accuracy: float

    def with_averages(self) -> pd.DataFrame:
        """The per-class rows followed by the macro and weighted average rows."""
        return pd.concat([self.per_class, self.averages], ignore_index=True)


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> None:
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be distinct, got {list(class_names)}")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {len(y_true)} and {len(y_pred)}")
    if y_true.size == 0:
        raise ValueError("y_true is empty: need at least one prediction to summarise")
    n_classes = len(class_names)
    for what, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"{what} must lie in [0, {n_classes - 1}] to match {n_classes} class names, "
                f"got values from {labels.min()} to {labels.max()}"
            )


def _report_rows(report: Mapping[str, Any], names: Sequence[str]) -> pd.DataFrame:
    """Rows of scikit-learn's ``classification_report`` dict, renamed to :data:`PER_CLASS_COLUMNS`."""
    frame = pd.DataFrame([{"class": name, **report[name]} for name in names])
    frame = frame.rename(columns={"f1-score": "f1"})[list(PER_CLASS_COLUMNS)]
    return frame.astype({"support": "int64"})


def classification_tables(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str] = FASHION_MNIST_CLASSES
) -> ClassificationSummary:
    """Per-class metrics (zero where undefined), macro and weighted averages, confusion matrix, accuracy."""
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    names = tuple(class_names)
    _check_labels(y_true, y_pred, names)
    labels = list(range(len(names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=names, output_dict=True, zero_division=0
    )
    return ClassificationSummary(
        class_names=names,
        per_class=_report_rows(report, names),
        averages=_report_rows(report, _AVERAGES),
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
        confusion_rates=confusion_matrix(y_true, y_pred, labels=labels, normalize="true"),
        accuracy=float(report["accuracy"]),
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
