"""Runs side by side: one row per model or backend, the accuracy gap between them and its verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from cnn_train.flows.reporting.markdown import format_percent
from cnn_train.plugins.contract import TrainHistory

COMPARISON_COLUMNS: tuple[str, ...] = (
    "name",
    "test_accuracy",
    "parameters",
    "seconds_per_epoch",
    "images_per_second",
)


@dataclass(frozen=True)
class ComparisonRow:
    """One model or backend in a comparison; unknown figures stay ``None``."""

    name: str
    test_accuracy: float
    parameters: int | None = None
    seconds_per_epoch: float | None = None
    images_per_second: float | None = None

    @classmethod
    def of(cls, name: str, history: TrainHistory, test_accuracy: float, parameters: int | None = None) -> ComparisonRow:
        """The row of a trained run, its speed as :class:`TrainHistory` defines it (the median epoch)."""
        return cls(
            name=name,
            test_accuracy=test_accuracy,
            parameters=parameters,
            seconds_per_epoch=history.seconds_per_epoch,
            images_per_second=history.images_per_second,
        )


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
    return frame.astype(
        {"parameters": "Int64", "test_accuracy": float, "seconds_per_epoch": float, "images_per_second": float}
    )


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


#: Points above chance (one class of N guessed every time) within which a model has learnt nothing.
CHANCE_MARGIN_POINTS = 2.0


def parity_verdict(accuracies: Mapping[str, float], tolerance_points: float = 1.0, *, classes: int = 10) -> str:
    """``"parity: max gap 0.40 points <= 1 (...)"`` or ``"no parity: max gap 2.10 points > 1 (...)"``; backends
    at chance level are named as such (two models answering one class each were called at parity)."""
    gap = accuracy_gap_points(accuracies)
    listing = ", ".join(f"{name} {format_percent(value)}" for name, value in accuracies.items())
    chance = 1 / classes
    guessing = [name for name, value in accuracies.items() if value <= chance + CHANCE_MARGIN_POINTS / 100]
    at_chance = f"at chance level ({format_percent(chance)} for {classes} classes): learnt nothing"
    if len(guessing) == len(accuracies):
        return f"no verdict: every backend is {at_chance} ({listing})"
    if gap <= tolerance_points:
        verdict = f"parity: max gap {gap:.2f} points <= {tolerance_points:g} ({listing})"
    else:
        verdict = f"no parity: max gap {gap:.2f} points > {tolerance_points:g} ({listing})"
    return verdict + (f"; {', '.join(guessing)} {at_chance}" if guessing else "")


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
