"""Where cnn-train keeps its state, in one place.

Everything lives under the project root by default so a checkout is self-contained:
``mlflow.db`` and ``mlartifacts/`` beside ``pyproject.toml``, everything else under ``.state/``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import urlparse

from cnn_train.flows.errors import ExpectedFailure

#: Prefect's own default home; its profiles file is where the user's Prefect settings live.
_USER_PREFECT_PROFILES = Path("~/.prefect/profiles.toml")

#: A temporary Prefect server migrates a fresh database first: on a busy 2-core machine that took
#: longer than Prefect's 20 s default, failing the run before it began.
_TEMPORARY_SERVER_STARTUP_SECONDS = "120"

_log = logging.getLogger(__name__)


def env_number(name: str, default: float, *, minimum: float, whole: bool = False) -> float:
    """``$name`` as a number of at least ``minimum`` (a whole one when ``whole``), or ``default`` when it is
    unset. Any other value is ignored with a warning that says what is allowed: these knobs are read on
    import, where an error would be a traceback from every command, ``--help`` included."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number >= minimum and (number.is_integer() or not whole):
        return int(number) if whole else number
    kind = "a whole number" if whole else "a number"
    _log.warning("ignoring $%s=%r: it must be %s, at least %g; using %g", name, value, kind, minimum, default)
    return default


_FLOW_HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
_PREFECT_MIN_HEARTBEAT_SECONDS = 30


def _valid_flow_heartbeat(value: str) -> bool:
    return value.strip().isdigit() and int(value) >= _PREFECT_MIN_HEARTBEAT_SECONDS


#: Seconds between a flow run's Prefect heartbeats: the user's own setting, else 30, Prefect's minimum.
#: Prefect's default, 180, is longer than the 90 s of silence after which the automation `cnn-train up`
#: creates crashes a flow run (cnn_train.flows.crashes). A value Prefect refuses is reported by
#: heartbeat_often_enough when a command starts.
FLOW_HEARTBEAT_SECONDS = (
    int(os.environ[_FLOW_HEARTBEAT_ENV]) if _valid_flow_heartbeat(os.environ.get(_FLOW_HEARTBEAT_ENV, "")) else 30
)

#: Telemetry off: nothing cnn-train starts reaches for the internet. MLflow wants "true", not "1";
#: a temporary Prefect server's telemetry also raced its own fresh database ("database is locked").
_OFFLINE = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def project_root() -> Path:
    """``CNN_TRAIN_ROOT`` when set, else the checkout this package was installed from, else the working directory."""
    if env := os.environ.get("CNN_TRAIN_ROOT"):
        if not Path(env).expanduser().is_dir():  # else a typo made a new, empty project, its runs out of view
            raise SettingError(f"CNN_TRAIN_ROOT={env!r} is no folder: point it at the project's folder, or unset it")
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "flows").is_dir():
        return checkout
    return Path.cwd().resolve()


class SettingError(ExpectedFailure):
    """An environment variable holding a value the process cannot run with."""


class StateDirError(ExpectedFailure):
    """The state folder cannot be created."""


def state_dir() -> Path:
    """Runtime state (caches, leases, pid files, Prefect home): ``CNN_TRAIN_STATE_DIR`` or ``<root>/.state``.

    A relative ``CNN_TRAIN_STATE_DIR`` is taken from the project root, as the default is: the servers run
    there, and a path taken from each process's own working directory sent them somewhere else.
    """
    given = os.environ.get("CNN_TRAIN_STATE_DIR")
    path = project_root() / Path(given).expanduser() if given else project_root() / ".state"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if given:
            named = f"CNN_TRAIN_STATE_DIR={given}"
            fix = f"point it at a folder you can write, or unset it to keep the state in {project_root() / '.state'}"
        else:
            # The root holds mlflow.db and mlartifacts/ too: moving the state alone leaves the store unwritable.
            named, fix = f"the state folder {path}", (
                f"set CNN_TRAIN_ROOT to a folder you can write (it holds mlflow.db, mlartifacts/ and .state/ in "
                f"place of {project_root()}), or CNN_TRAIN_STATE_DIR alone if MLFLOW_TRACKING_URI names a store elsewhere"
            )
        raise StateDirError(f"{named} cannot be created ({error.strerror}); {fix}") from None
    return path


def sqlite_database(uri: str) -> Path | None:
    """The database file a ``sqlite:///path`` tracking URI names, as MLflow reads it; None for another kind
    of store, or an in-memory one."""
    parsed = urlparse(uri)
    path = parsed.path.removeprefix("/")
    return Path(path) if parsed.scheme == "sqlite" and path not in ("", ":memory:") else None


def default_database() -> Path:
    """The project's SQLite store's file."""
    return project_root() / "mlflow.db"


def default_tracking_uri() -> str:
    """The project's SQLite store, as an absolute URI so the working directory does not matter."""
    return f"sqlite:///{default_database()}"


def default_artifact_root() -> Path:
    return project_root() / "mlartifacts"


def servers_prefect_home() -> Path:
    """``PREFECT_HOME`` of the servers ``cnn-train up`` starts: the Prefect server's database."""
    return state_dir() / "prefect"


def temporary_prefect_home() -> Path:
    """``PREFECT_HOME`` of commands run without servers: the temporary server's database and results.
    Apart from :func:`servers_prefect_home` so the two servers never share one SQLite file."""
    path = state_dir() / "prefect-temporary"
    path.mkdir(exist_ok=True)  # Prefect creates its home without parents, and only warns when it cannot
    return path


def keep_library_state_in_project(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make the libraries keep what they write under the state directory instead of the home
    directory, for this process and the ones it starts; must run before they are imported.

    Prefect (a temporary server's database, memo and results) goes to :func:`temporary_prefect_home`
    unless the user set ``PREFECT_HOME``; its database, result storage and profiles settings are left
    alone, so explicit values of those win too (Prefect derives them from ``PREFECT_HOME`` only when
    unset), and the user's profile is still read from its usual place. Matplotlib's font cache goes
    to ``matplotlib/``, and torch's inductor cache (made when a pt2 model is exported or loaded) to
    ``torchinductor/``, unless ``MPLCONFIGDIR`` or ``TORCHINDUCTOR_CACHE_DIR`` is set."""
    environ.setdefault("MPLCONFIGDIR", str(state_dir() / "matplotlib"))
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state_dir() / "torchinductor"))
    # Whatever PREFECT_HOME is: a temporary server's first migrations outlast Prefect's 20 s on a busy box.
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", _TEMPORARY_SERVER_STARTUP_SECONDS)
    if environ.get("PREFECT_HOME"):
        return
    environ.setdefault("PREFECT_PROFILES_PATH", str(_USER_PREFECT_PROFILES.expanduser()))
    environ["PREFECT_HOME"] = str(temporary_prefect_home())


#: Set in the processes `up` starts to run flow runs (the serve process, the worker): their
#: MLFLOW_TRACKING_URI is up's choice, so advice to unset it is for a user's shell, not for their runs.
TRACKING_URI_BY_UP_ENV = "CNN_TRAIN_TRACKING_URI_BY_UP"


def tracking_uri_set_by_up() -> bool:
    return os.environ.get(TRACKING_URI_BY_UP_ENV) == "1"


def heartbeat_environment() -> dict[str, str]:
    """What a process running flow runs needs for Prefect to hear it is alive as often as the servers'
    zombie automation expects."""
    return {_FLOW_HEARTBEAT_ENV: str(FLOW_HEARTBEAT_SECONDS)}


def heartbeat_often_enough(environ: MutableMapping[str, str] = os.environ) -> None:
    """Flow runs of this process (and the ones it starts) send Prefect heartbeats every
    :data:`FLOW_HEARTBEAT_SECONDS` (unless set): on the servers `cnn-train up` started, a run beating at
    Prefect's default would be marked Crashed while it still runs. Must run before Prefect is imported, which
    would refuse a value of the user's that is not a whole number of seconds, at least 30, with a traceback."""
    given = environ.get(_FLOW_HEARTBEAT_ENV)
    if given is not None and not _valid_flow_heartbeat(given):
        raise SettingError(
            f"{_FLOW_HEARTBEAT_ENV}={given!r} is refused by Prefect: set a whole number of seconds, at least "
            f"{_PREFECT_MIN_HEARTBEAT_SECONDS}, or unset it for cnn-train's {FLOW_HEARTBEAT_SECONDS}"
        )
    for name, value in heartbeat_environment().items():
        environ.setdefault(name, value)


def keep_libraries_offline(environ: MutableMapping[str, str] = os.environ) -> None:
    """Switch Prefect's and MLflow's telemetry off for this process and the ones it starts (unless set)."""
    for name, value in _OFFLINE.items():
        environ.setdefault(name, value)


def configure_process(*, verbose: bool = False) -> None:
    """What every cnn-train command does first, for a script or notebook that calls the flows from Python:
    Prefect's and the other libraries' files under the state folder (:func:`keep_library_state_in_project`),
    telemetry off, flow-run heartbeats the servers expect, and the libraries' known noise silenced (unless
    ``verbose``). Call it before Prefect or MLflow is imported; each setting the user made stays."""
    from cnn_train.flows.quiet import quiet_libraries

    keep_library_state_in_project()
    keep_libraries_offline()
    heartbeat_often_enough()
    quiet_libraries(verbose=verbose)
