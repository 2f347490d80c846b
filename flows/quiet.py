"""Quiet by default: what the libraries print that a cnn-train user cannot act on is silenced where it
is emitted (one logger, one warning), so the terminal shows the run's own progress and problems.
``cnn-train --verbose`` leaves the libraries' logs and warnings as they come.

Call :func:`quiet_libraries` before Prefect and MLflow are imported: the settings it sets are read
then, and by the processes this one starts (a temporary Prefect server, served flow runs)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping

#: Announcements of what a command starts and stops for itself, and advice no user can act on, by logger: Prefect's temporary server
#: (every start and stop, with a pointer to its docs; `cnn-train run` without servers is the intended
#: use), and the local Ray instance a `--task-runner ray` sweep starts: Ray's notice that token
#: authentication is on (its default, kept: the instance listens beyond loopback), how to opt out, and
#: where it saved the token (~/.ray/auth_token).
_ANNOUNCEMENTS: dict[str, tuple[str, ...]] = {
    "prefect": ("Starting temporary server", "Stopping temporary server"),
    "ray._private.worker": ("Started a local Ray instance",),
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",
        "Generated new authentication token",
    ),
    # MLflow's advice, at every pyfunc plugin's model, to log models from code rather than pickle the
    # PythonModel: the contract hands the flow an instance (LoggableModel.model), which the plugin's
    # author cannot change, and loading it runs the plugin's shipped code either way.
    "mlflow.pyfunc": ("Passing a Python object as `python_model`",),
}

#: MLflow logs schema creation and migrations of a new store at INFO; its warnings stay.
_MLFLOW_LOGGER = "mlflow"
_MLFLOW_LEVEL = "WARNING"

#: Python warnings known to be harmless here: (message regex, category, module regex). MLflow 3's SQL
#: store sets up its tables' mappers with a loader strategy SQLAlchemy deprecates: MLflow's to change.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning, r"mlflow\."),
)


class _DropAnnouncements(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``; every other record passes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries(*, verbose: bool = False, environ: MutableMapping[str, str] = os.environ) -> None:
    """Silence the known noise; with ``verbose``, let MLflow's INFO lines through instead (the root
    logger Prefect configures passes only warnings). A level the user set (``MLFLOW_LOGGING_LEVEL``) wins."""
    if verbose:
        logging.getLogger(_MLFLOW_LOGGER).setLevel(environ.get("MLFLOW_LOGGING_LEVEL", "INFO").upper())
        return
    environ.setdefault("MLFLOW_LOGGING_LEVEL", _MLFLOW_LEVEL)
    # MLflow's tqdm bars for model downloads (a few MB here) land on stderr, which carries only failures.
    environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: URL" and "View experiment at: URL" to stdout as each run on a server
    # ends (a compare's every backend, a sweep's every trial); the commands print the links that matter.
    environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name, prefixes in _ANNOUNCEMENTS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAnnouncements) for f in logger.filters):
            logger.addFilter(_DropAnnouncements(prefixes))
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quieted() -> bool:
    """Whether :func:`quiet_libraries` silenced this process: a Ray trial then silences its worker too."""
    return any(isinstance(f, _DropAnnouncements) for f in logging.getLogger("prefect").filters)


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger, or the module logger ``fallback`` outside any run (a trial in a bare thread)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
