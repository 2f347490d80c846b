"""Failures a user can fix (bad input, a bad dataset, an unreachable server, a missing GPU), told in
one line with no traceback; everything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

#: Set (to anything but "" or "0") by ``cnn-train --debug``: expected failures keep their tracebacks too.
DEBUG_ENV = "CNN_TRAIN_DEBUG"

# Where Prefect's engine reports a failed flow or task run, with the exception attached.
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedFailure(Exception):
    """A failure the user can fix; its message is one line saying what was wrong and what to do."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# What the engine of a served or worker flow run logs after the flow's own failure, raising the failed
# state again (as a FailedRun): for a failure the user can fix, an ERROR calling it "unexpected".
_ENGINE_RESTATEMENT = "Engine execution exited with unexpected exception"


class _HideExpectedTracebacks(logging.Filter):
    """Keep a log record's message but drop its traceback when the exception is an ExpectedFailure or a
    full disk (its message says it all), or
    Prefect's FailedRun, a traceback of Prefect's own frames only, logged after the failure itself (with
    its traceback when it is a bug); the engine's restatement of such a failure goes altogether."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _hidden(record.exc_info[1]) and not debugging():
            if record.msg == _ENGINE_RESTATEMENT:
                return False
            record.exc_info = None
            record.exc_text = None
        return True


def _hidden(error: BaseException | None) -> bool:
    from prefect.exceptions import FailedRun  # imported already: the records come from Prefect's loggers

    from cnn_train.flows.diskspace import disk_full

    return isinstance(error, (ExpectedFailure, FailedRun)) or disk_full(error)


_FILTER = _HideExpectedTracebacks()

# MLflow's SQL store logs each failed write with its traceback before raising it: on a full disk, the
# courier's retries made thousands of lines while the run's own line said it all (diskspace.disk_full).
_MLFLOW_SQL_LOGGER = "mlflow.store.db.utils"


class _DropFullDiskErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from cnn_train.flows.diskspace import disk_full

        return debugging() or not (record.exc_info and disk_full(record.exc_info[1]))


_FULL_DISK_FILTER = _DropFullDiskErrors()


def hide_expected_tracebacks() -> None:
    """Make Prefect log an expected failure of a flow or task run as its one line (console and UI alike), and
    MLflow's SQL store not log each write a full disk refused (the run says so once).

    Logger filters survive Prefect re-running its logging setup (dictConfig adds filters, never clears them).
    """
    for name in _RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if _FULL_DISK_FILTER not in (sql := logging.getLogger(_MLFLOW_SQL_LOGGER)).filters:
        sql.addFilter(_FULL_DISK_FILTER)


def close_names(typed: str, names: Sequence[str], *, separator: str = "_") -> list[str]:
    """The ``names`` a mistyped ``typed`` may mean, at most three: by initials (``lr``:
    ``learning_rate``), as a beginning (``arch``) or a last part (``device``: ``prep-device`` and
    ``train-device``), else the closest by spelling, dashes left out. The spelling cutoff is 0.7,
    not Click's 0.6, which offered --prep-device for --compare-dense; typos such as ``epoks`` score
    0.72 and more."""
    import difflib

    word = typed.lstrip("-").lower()  # an option's dashes are no part of its initials or words
    bare = {n: n.lstrip("-") for n in names}
    named = {b: n for n, b in bare.items()}
    by_initials = [n for n in names if len(word) > 1 and "".join(part[:1] for part in bare[n].split(separator)) == word]
    by_part = [n for n in names if len(word) > 2 and (bare[n].startswith(word) or bare[n].endswith(separator + word))]
    scores = sorted(((difflib.SequenceMatcher(None, word, b).ratio(), b) for b in named), reverse=True)
    # The closest spelling, and any as close: 'defualt' means 'default', not every name sharing letters.
    by_spelling = [b for score, b in scores[:3] if score >= max(0.7, scores[0][0] - 0.05)] if scores else []
    return list(dict.fromkeys(by_initials + by_part))[:3] or [named[b] for b in by_spelling]


def did_you_mean(typed: str, names: Sequence[str]) -> str:
    """``' (did you mean learning_rate?)'``, or nothing when no name is close."""
    close = close_names(typed, names)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def one_line_reason(error: BaseException) -> str:
    """What went wrong, in one line: an expected failure's own message, else the exception's type and message."""
    text = str(error) if isinstance(error, ExpectedFailure) else f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
