"""Where the tracking store is, whether it answers, and how a person can browse a run in it."""

from __future__ import annotations

import functools
import os
import re
import shlex
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlparse

from mlflow import MlflowClient

from cnn_train.flows.ops import services
from cnn_train.flows.ops.addresses import same_server, start_hint
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import default_tracking_uri, sqlite_database, tracking_uri_set_by_up


class TrackingUnavailableError(ExpectedFailure, RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


class RunAddress(Protocol):
    """Where a run is: its store, experiment and id (a :class:`~cnn_train.flows.tracking.RunTracker` is one)."""

    @property
    def uri(self) -> str: ...

    @property
    def experiment_id(self) -> str: ...

    @property
    def run_id(self) -> str: ...


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's MLflow server when ``cnn-train up`` runs it,
    else the project's ``mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or services.project_mlflow_server() or default_tracking_uri()


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def ready_store(uri: str) -> None:
    """Open a SQLite store, making its schema if it is new, under an OS lock beside it (``<file>.lock``),
    once per process. MLflow makes a new store by applying its migrations one by one; two processes doing
    it to one new file at once failed ('Online migration expected to match one row', 'duplicate column'),
    and one interrupted that way left a temporary table that broke the store for every later run.
    Other stores (a server, a database of the user's) are theirs to manage."""
    if (database := sqlite_database(uri)) is not None:
        _ready_sqlite_store(uri, database.expanduser())


@functools.cache
def _ready_sqlite_store(uri: str, database: Path) -> None:
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes, or the process ends
        try:
            probe = MlflowClient(tracking_uri=uri, registry_uri=uri)
            probe.search_experiments(max_results=1)
            probe.search_registered_models(max_results=1)
        except Exception as error:  # SQLAlchemy's and Alembic's, whose modules are not imported here
            detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            why = (
                "another program holds it locked; let it finish, or stop it" if "database is locked" in detail
                else "a change of its schema was interrupted, or it is no MLflow store this version can read; "
                "put back a copy that works, or move it away and a new store is made"
            )
            raise TrackingUnavailableError(f"the MLflow store {database} cannot be opened ({detail}): {why}") from error


def check_reachable(uri: str, *, timeout: float = 5.0, as_client: bool = True) -> None:
    """Fail fast, with what to do about it, when an HTTP tracking server does not answer, or refuses this
    client (``as_client``: one API call), or MLflow has no store for the URI's scheme (a typo such as
    ``htp://``); a local store is not opened here. The probes during a run pass ``as_client=False``: the
    client was checked as the run began, and they only ask whether the server is there."""
    if not _is_server(uri):
        _check_scheme(uri)
        return
    parsed = urlparse(uri)
    if parsed.fragment or parsed.query:  # /health would still answer: the fragment never reaches the server
        address = parsed._replace(query="", fragment="").geturl().rstrip("/")
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {uri} is a page of the MLflow UI, not the server's address; set it to {address}"
        )
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310 - user-configured URI
            if response.status == 200:
                if as_client:
                    _check_accepted(uri)
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    project = services.mlflow_url()
    # `cnn-train up` starts the project's server on its own port: at another address it would not start this one.
    start = "start it with `cnn-train up`" if same_server(uri, project) else (
        f"`cnn-train up` serves the project's MLflow at {project}, not there ({services.mlflow_server.port_variable} moves it)"
    )
    elsewhere = (
        ": the flow runs `cnn-train up` serves log there" if tracking_uri_set_by_up()
        else ", or unset MLFLOW_TRACKING_URI to log to the project's mlflow.db"
    )
    raise TrackingUnavailableError(f"MLflow tracking server {uri} is not reachable ({problem}); {start_hint(uri, start)}{elsewhere}")


def _check_accepted(uri: str) -> None:
    """An MLflow server's /health answers anyone; its API may still refuse this client: its credentials
    (the basic-auth app), or the host name it was called by (MLflow's guard against DNS rebinding lets
    only loopback and private addresses through unless MLFLOW_SERVER_ALLOWED_HOSTS names more)."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as error:
        if "Invalid Host header" in str(error):
            host = urlparse(uri).hostname
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} refuses to be called by the name {host!r} (its guard against DNS "
                f"rebinding); start it with MLFLOW_SERVER_ALLOWED_HOSTS={host},{host}:* in the environment of "
                "`cnn-train up`, or call it by its IP address"
            ) from None
        if error.get_http_status_code() == 401:
            presented = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} refused "
                + ("this client's credentials" if presented else "this client, which presents no credentials")
                + " (401 Unauthorized); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the servers' "
                "user and password"
            ) from None
        # Any other answer is the server's to give again where the work meets it, with its own context.


def _check_scheme(uri: str) -> None:
    """MLflow builds a client's store at once and refuses a scheme it has none for; the schemes of its
    file and database stores are known without opening one (SQLAlchemy's import costs a second)."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
    from mlflow.utils.uri import get_uri_scheme

    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # HOST:PORT, which reads as a path or a scheme
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {uri} has no scheme; a server's address starts with it: http://{uri}"
        )
    scheme = get_uri_scheme(uri)
    if scheme in ("", "file"):
        if not MLFLOW_ALLOW_FILE_STORE.get():  # MLflow 3 refuses it when the run starts, not before
            instead = f"sqlite:///{uri}" if scheme == "" and uri.endswith(".db") else "sqlite:///FILE.db"
            raise TrackingUnavailableError(
                f"MLFLOW_TRACKING_URI {uri} names a folder of files (MLflow's file store), which MLflow 3 "
                f"refuses unless MLFLOW_ALLOW_FILE_STORE=true; use {instead} or http://HOST:PORT, "
                "or unset it to log to the project's mlflow.db"
            )
        return
    if scheme in DATABASE_ENGINES:
        if scheme == "sqlite":
            _check_sqlite_writable(uri)
        else:
            _check_database_driver(uri)
        return
    try:
        client(uri)
    except UnsupportedModelRegistryStoreURIException as error:
        schemes = ", ".join(scheme for scheme in error.supported_uri_schemes if scheme)
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {uri} has a scheme MLflow has no tracking store for; use "
            f"sqlite:///FILE, http://HOST:PORT or another of its schemes ({schemes}), "
            "or unset it to log to the project's mlflow.db"
        ) from None


def _check_sqlite_writable(uri: str) -> None:
    """A SQLite store this user can write: its file, and its folder (SQLite writes a journal beside it, and
    MLflow makes a missing folder). Unchecked, a read-only checkout's run retried for 3.5 minutes, then
    failed inside its flow run with 'unable to open database file'."""
    if (named := sqlite_database(uri)) is None:
        return
    database = named.expanduser()
    folder = database.parent
    # os.path.exists, not Path.exists: under a folder this user cannot enter, the latter raises.
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    blocked = folder if not os.access(folder, os.W_OK) else (
        database if os.path.exists(database) and not os.access(database, os.W_OK) else None
    )
    if blocked is None:
        return
    if uri == default_tracking_uri():
        named, fix = "the project's store", (
            "set CNN_TRAIN_ROOT to a folder you can write (it holds mlflow.db, mlartifacts/ and .state/), "
            "or MLFLOW_TRACKING_URI to a store you can write"
        )
    else:  # a store the user named: the project's folder has nothing to do with it
        named, fix = f"MLFLOW_TRACKING_URI {uri}", "point it at a store you can write"
    raise TrackingUnavailableError(f"{named}: this user cannot write {blocked} (permission denied); {fix}")


@functools.cache  # a run's heartbeat checks its store every few seconds; a driver found stays found
def _check_database_driver(uri: str) -> None:
    """A database store's Python driver, which MLflow would first import inside the run."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = without_password(uri)
    try:
        make_url(uri).get_dialect().import_dbapi()
    except ModuleNotFoundError as error:
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {shown} needs the database driver {error.name!r}, which is not installed "
            "here; install it into this environment, or unset MLFLOW_TRACKING_URI to log to the project's mlflow.db"
        ) from None
    except (ArgumentError, NoSuchModuleError) as error:
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {shown} is no database URI SQLAlchemy can use ({error}); "
            "unset it to log to the project's mlflow.db"
        ) from None


def ui_base_url(uri: str) -> str | None:
    """The web UI serving ``uri``, when it is a server; None for a store read directly (SQLite, files)."""
    return uri.rstrip("/") if _is_server(uri) else None


def artifact_url(uri: str, run_id: str, path: str) -> str | None:
    """A browser URL serving one artifact of a run, when the store is an MLflow server."""
    base = ui_base_url(uri)
    if base is None:
        return None
    return f"{base}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def experiment_url(uri: str, experiment_id: str) -> str | None:
    """The experiment's runs in the MLflow UI's model-training view, when the store is an MLflow server."""
    base = ui_base_url(uri)
    return None if base is None else f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the store is an MLflow server; None otherwise."""
    base = ui_base_url(uri)
    return None if base is None else _run_page(base, experiment_id, run_id)


def open_hint(run: RunAddress) -> str:
    """The exact way to see ``run`` in a browser: ``open <its URL>`` when an MLflow server holds it,
    ``cnn-train up --no-trigger, then open <URL>`` for the project's own store, else the lean ``mlflow server``
    command for its store, then the URL."""
    if url := run_url(run.uri, run.experiment_id, run.run_id):
        return f"open {url}"
    store = _absolute_store(run.uri)
    if store == _absolute_store(default_tracking_uri()):
        # --no-trigger: a plain `up` also starts the default deployment's full training run.
        return f"cnn-train up --no-trigger, then open {_run_page(services.mlflow_url(), run.experiment_id, run.run_id)}"
    # Another store: on the project's port when it is free, else on one that is (the project's server,
    # up for its own store, holds it).
    port = services.mlflow_port() if not _taken(services.mlflow_port()) else _free_port()
    page = _run_page(f"http://{services.HOST}:{port}", run.experiment_id, run.run_id)
    command = [
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false",
        *(["MLFLOW_ALLOW_FILE_STORE=true"] if urlparse(store).scheme in ("", "file") else []),
        "mlflow",
        "server",
        "--backend-store-uri",
        shlex.quote(without_password(store)),
    ]
    if (database := sqlite_database(store)) is not None:
        # Where ensure_experiment pins a SQLite store's artifacts, so runs logged later land there too.
        artifacts = database.parent / "mlartifacts"
        command += ["--artifacts-destination", shlex.quote(str(artifacts))]
    command += ["--host", services.HOST, "--port", str(port), "--workers", "1"]
    return f"{' '.join(command)}, then open {page}"


def _taken(port: int) -> bool:
    """Whether something listens on ``port`` of this machine's loopback."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((services.HOST, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((services.HOST, 0))
        return int(sock.getsockname()[1])


def waiting_on(uri: str) -> str:
    """The store a spool's records wait for, and how it comes back: ``MLflow at http://127.0.0.1:5000
    (`cnn-train up` starts it)``. A run without servers said only "MLflow did not answer" about another run's
    records, waiting for a server nobody had named."""
    if not _is_server(uri):
        return f"the store {uri}"
    start = "`cnn-train up` starts it" if same_server(uri, services.mlflow_url()) else start_hint(uri, "start it")
    return f"MLflow at {uri} ({start})"


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


#: MLflow 3.17's UI picks its view (GenAI or model training) from this URL parameter, else from the
#: browser's last choice (GenAI at first); with its workflow switcher on, it ignores the experiment's
#: kind tag for that. Links carry it so a run opens where a trained model belongs.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def _run_page(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def _absolute_store(uri: str) -> str:
    """A SQLite URI with an absolute path (``sqlite:////abs/x.db``), so it means the same from any directory."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path.removeprefix("/"):
        return uri
    return f"sqlite:///{Path(parsed.path.removeprefix('/')).resolve()}"


def without_password(uri: str) -> str:
    """A database URI fit to print: its password masked."""
    parsed = urlparse(uri)
    if not parsed.password:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()
