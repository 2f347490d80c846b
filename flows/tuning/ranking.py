"""A study's trials as a person reads them: how each ended, and the ranking table (pandas)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from cnn_train.flows.tuning.study import RUN_ATTR, run_again_as

#: MLflow tag saying how a trial ended: ``complete``, ``pruned at epoch k`` or ``failed``.
STATE_TAG = "cnn_train.trial_state"
#: Trial attributes the flow records before telling Optuna how a trial ended.
TEST_ACCURACY_ATTR = "cnn_train.test_accuracy"
MODEL_URI_ATTR = "cnn_train.model_uri"

_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2}


def pruned_label(epoch: int) -> str:
    return f"pruned at epoch {epoch}"


def state_label(trial: FrozenTrial) -> str:
    """How the trial ended, in the words of the MLflow tag."""
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return pruned_label(trial.last_step or 0)
    return trial.state.name.lower().replace("fail", "failed")


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def ranking_table(trials: Sequence[FrozenTrial], objective: str) -> pd.DataFrame:
    """Ended trials best first: complete ones by ``objective``, then pruned ones by the value they were
    stopped at, then failed ones; with each trial's parameters, epochs, test accuracy and MLflow run."""
    ended = sorted(
        (t for t in trials if t.state in _ORDER),
        key=lambda t: (_ORDER[t.state], -(t.value if t.value is not None else float("-inf")), t.number),
    )
    params = sorted({name for trial in ended for name in trial.params})
    again = run_again_as(list(trials))
    frame = pd.DataFrame(
        [
            {
                "trial": trial.number,
                "state": state_label(trial) + (f", run again as trial {again[trial.number]}" if trial.number in again else ""),
                # A pruned trial's value is the validation accuracy it was stopped at (Optuna's convention).
                objective: trial.value,
                **{name: trial.params.get(name) for name in params},
                "epochs": trial.last_step,
                "test_accuracy": trial.user_attrs.get(TEST_ACCURACY_ATTR),
                "seconds": _seconds(trial),
                "run_id": trial.user_attrs.get(RUN_ATTR),
            }
            for trial in ended
        ],
        columns=["trial", "state", objective, *params, "epochs", "test_accuracy", "seconds", "run_id"],
    )
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Ended trials by how they ended: complete, pruned, failed."""
    return {
        word: sum(1 for t in trials if t.state == state)
        for word, state in (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL))
    }
