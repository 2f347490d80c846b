"""Optuna's own figures of a study (its matplotlib visualisation module) as PNG files, each checked to
be non-blank; a figure the study cannot have yet is skipped with a note saying why."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

#: File name -> what the figure shows.
FIGURES = {
    "optimization_history.png": "best objective value after each trial",
    "intermediate_values.png": "each trial's validation accuracy per epoch, pruned ones stopping early",
    "param_importances.png": "how much each searched field explains the objective",
}
#: Figures whose x axis counts something, and what (Optuna labels the epochs "Step").
_WHOLE_X = {"optimization_history.png": "Trial", "intermediate_values.png": "Epoch"}
#: Share of pixels that must differ from the background for a figure to count as drawn.
_MIN_INKED = 0.01


@dataclass(frozen=True)
class StudyFigures:
    files: tuple[Path, ...]
    #: File name -> why it was not drawn.
    skipped: dict[str, str]


def inked_share(png: Path) -> float:
    """Share of the image's pixels that are not its most common colour (the background)."""
    from matplotlib.image import imread

    pixels = imread(png)
    flat = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    return 1.0 - counts.max() / len(flat)


def _why_not(study: optuna.Study, name: str) -> str | None:
    """Why the study cannot have figure ``name`` yet, or None when it can."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if name == "optimization_history.png" and not complete:
        return "no trial completed yet"
    if name == "intermediate_values.png" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return "no trial reported an epoch yet"
    if name == "param_importances.png":
        if len(complete) < 2:
            return f"parameter importance needs at least 2 completed trials ({len(complete)} so far)"
        if not any(len({repr(t.params.get(p)) for t in complete}) > 1 for p in complete[0].params):
            return "no searched field took different values in the completed trials"
        # Optuna's default evaluator (PED-ANOVA) compares the best trials with all of them: when every
        # trial scored the same, the two sets are one, and it would draw equal bars with a warning.
        if len({t.value for t in complete}) == 1:
            return f"all {len(complete)} completed trials scored the same, so no field explains the objective"
    return None


def _plot(study: optuna.Study, name: str) -> Any:
    from optuna.visualization import matplotlib as optuna_plots

    plot: Callable[[optuna.Study], Any] = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "intermediate_values.png": optuna_plots.plot_intermediate_values,
        "param_importances.png": optuna_plots.plot_param_importances,
    }[name]
    return plot(study)


def write_study_figures(study: optuna.Study, folder: Path) -> StudyFigures:
    """Draw each of Optuna's figures the study can have into ``folder``; a blank one counts as skipped."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    skipped: dict[str, str] = {}
    for name in FIGURES:
        if (reason := _why_not(study, name)) is not None:
            skipped[name] = reason
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib module is marked experimental
            try:
                axes = _plot(study, name)
            except (ValueError, RuntimeError) as error:  # e.g. an importance evaluator with too few trials
                skipped[name] = f"Optuna could not draw it: {error}"
                continue
        if name in _WHOLE_X:  # trials and epochs are counted: no tick at 1.25
            from matplotlib.ticker import MaxNLocator

            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel(_WHOLE_X[name])
        figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
        figure.set_size_inches(8, 5)
        path = folder / name
        figure.savefig(path, dpi=100, facecolor="white", bbox_inches="tight")
        plt.close(figure)
        if inked_share(path) < _MIN_INKED:
            path.unlink()
            skipped[name] = "the drawn figure was blank"
            continue
        files.append(path)
    return StudyFigures(tuple(files), skipped)
