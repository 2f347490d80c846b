"""The local servers behind ``cnn-train up``: a Prefect server, an MLflow server, and the process
serving the ``cnn-train/default`` deployment. Each is started once, detached, with its pid and log
under the state directory, and found again by a health check, so ``up`` is idempotent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import (
    default_artifact_root,
    heartbeat_environment,
    project_root,
    servers_prefect_home,
    state_dir,
)

HOST = "127.0.0.1"
#: The addresses the servers may listen on (`cnn-train up --host`): this machine only, or every interface.
#: Clients here always use HOST, so one other interface alone would leave them unanswered.
BindHost = Literal["127.0.0.1", "0.0.0.0"]
BIND_HOST_ENV = "CNN_TRAIN_BIND_HOST"


def bind_host() -> str:
    return os.environ.get(BIND_HOST_ENV) or HOST


def _credentials():  # noqa: ANN202 - auth.Credentials | None
    from cnn_train.flows import auth

    return auth.load_credentials()


def client_credentials() -> dict[str, str]:
    """The servers' credentials for every client cnn-train starts (none when none are configured)."""
    credentials = _credentials()
    return credentials.client_environment() if credentials else {}


def _server_credentials() -> dict[str, str]:
    credentials = _credentials()
    return credentials.server_environment() if credentials else {}


def _mlflow_auth_app() -> list[str]:
    return ["--app-name", "basic-auth"] if _credentials() else []
DEPLOYMENT = "cnn-train/default"


def prefect_port() -> int:
    return _port(prefect_server, 4200)


def mlflow_port() -> int:
    return _port(mlflow_server, 5000)


class PortError(ExpectedFailure):
    """A port variable that holds no port."""


class PortInUseError(ExpectedFailure):
    """A server's port is held by some other program."""


def _port(service: Service, default: int) -> int:
    """The port ``service.port_variable`` gives; else the one ``cnn-train up`` started ``service`` on, while it runs (a
    shell without the variable would otherwise miss the server, and record runs in ``mlflow.db``); else ``default``."""
    variable = service.port_variable
    if value := os.environ.get(variable):
        if not (value.strip().isdigit() and 1 <= int(value) <= 65535):
            raise PortError(
                f"{variable}={value!r} is not a port: set a whole number from 1 to 65535, or unset it to use "
                f"the port `cnn-train up` recorded, else {default}"
            )
        return int(value)
    try:
        recorded = int(service.port_file.read_text())
    except (OSError, ValueError):
        return default
    return recorded if service.pid() is not None else default


def prefect_api_url() -> str:
    return f"http://{HOST}:{prefect_port()}/api"


def prefect_ui_url() -> str:
    return f"http://{HOST}:{prefect_port()}"


def mlflow_url() -> str:
    return f"http://{HOST}:{mlflow_port()}"


def quiet_environment() -> dict[str, str]:
    """Settings that keep Prefect and MLflow off the internet and their state in the project."""
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_HOME": str(servers_prefect_home()),
        "PREFECT_API_URL": prefect_api_url(),
        "CNN_TRAIN_ROOT": str(project_root()),
    } | client_credentials()


def http_ok(url: str, *, timeout: float = 2.0) -> bool:
    return http_json(url, timeout=timeout) is not None


def http_json(url: str, *, timeout: float = 2.0) -> object | None:
    """The JSON a GET of ``url`` answers (``{}`` for a body that is not JSON), or None when it does not
    answer with a success."""
    request = urllib.request.Request(url)
    if credentials := _credentials():
        request.add_header("Authorization", credentials.basic_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback only
            if not 200 <= response.status < 300:
                return None
            body = response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return {}


@dataclass(frozen=True)
class Service:
    """A detached process with a pid file, a log file and a readiness probe."""

    name: str
    command: Callable[[], list[str]]
    ready: Callable[[], bool]
    extra_env: Callable[[], dict[str, str]] = dict
    #: The port a server listens on, recorded beside its pid while it runs, and the variable that sets it.
    port: Callable[[], int] | None = None
    port_variable: str = ""
    #: What to do just before the process starts (not when it already runs).
    before_start: Callable[[], object] = lambda: None

    @property
    def pid_file(self) -> Path:
        return state_dir() / "run" / f"{self.name}.pid"

    @property
    def port_file(self) -> Path:
        return state_dir() / "run" / f"{self.name}.port"

    @property
    def log_file(self) -> Path:
        return state_dir() / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The recorded pid when that process is still alive."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        # Killed but not yet reaped by the process that started it: gone all the same.
        return None if _is_zombie(pid) else pid

    def start(self, *, timeout: float = 90.0) -> bool:
        """Start unless already ready; returns whether it had to start. Waits until ready."""
        if self.ready():
            return False
        if self.pid() is None:
            self._check_port_free()
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            env = os.environ | quiet_environment() | self.extra_env()
            self.before_start()
            with self.log_file.open("ab") as log:
                process = subprocess.Popen(  # noqa: S603 - our own commands
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=project_root(),
                    start_new_session=True,  # survives this command; stopped by `cnn-train down`
                )
            self.pid_file.write_text(str(process.pid))
            if self.port is not None:
                self.port_file.write_text(str(self.port()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if self.pid() is None:
                self.pid_file.unlink(missing_ok=True)
                self.port_file.unlink(missing_ok=True)
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log_file}:\n{_tail(self.log_file)}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_file}:\n{_tail(self.log_file)}")

    def _check_port_free(self) -> None:
        """Refuse in one line a port another program holds: the server would exit at once, saying so
        only in its log."""
        if self.port is None:
            return
        port, host = self.port(), bind_host()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no holder
            try:
                probe.bind((host, port))
            except OSError as error:
                raise PortInUseError(
                    f"{self.name} cannot listen on {host}:{port}: {error.strerror.lower()}, by a program that does "
                    f"not answer as {self.name}; stop it, or choose a free port with {self.port_variable}"
                ) from None

    def stop(self, *, timeout: float = 20.0) -> bool:
        """Stop the process group; returns whether anything was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self.port_file.unlink(missing_ok=True)
            return False
        # INT first: a Prefect worker started in the background from a non-interactive shell ignores TERM
        # (Prefect maps TERM to INT, which such a shell set to ignore), measured with Prefect 3.9.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout / 3
            while time.monotonic() < deadline and self.pid() is not None and not _is_zombie(pid):
                time.sleep(0.2)
            if self.pid() is None or _is_zombie(pid):
                break
        self.pid_file.unlink(missing_ok=True)
        self.port_file.unlink(missing_ok=True)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _ui_api_url() -> str:
    """Where the Prefect UI's browser finds the API: this machine's name when others may browse it."""
    if bind_host() == HOST:
        return prefect_api_url()
    return f"http://{socket.getfqdn()}:{prefect_port()}/api"


def _deployment_served() -> bool:
    """The serve process runs and the deployment is its own: registered by it, and on no work pool (after
    `cnn-train up --worker` the serve process first takes it back from the pool)."""
    if serve_process.pid() is None:
        return False
    deployment = http_json(f"{prefect_api_url()}/deployments/name/{DEPLOYMENT}")
    return (
        isinstance(deployment, dict)
        and not deployment.get("work_pool_name")
        and registered_since(deployment, serve_process.pid_file.stat().st_mtime)
    )


#: The serve process's pid file is written just after it starts; the Prefect server (on this machine)
#: stamps the registration later. The slack covers the two clocks' granularity.
_CLOCK_SLACK_SECONDS = 1.0


def registered_since(deployment: dict[str, Any], started: float) -> bool:
    """Whether the deployment was registered (created or updated) after ``started`` (seconds since the
    epoch). An earlier serve process's registration may carry other parameters, after an upgrade: the
    server checks a run's parameters against it, so it refused a new one until the new process had
    registered, some seconds after `up` had said the deployment was served."""
    updated = datetime.fromisoformat(deployment.get("updated") or deployment["created"])
    return updated.timestamp() >= started - _CLOCK_SLACK_SECONDS


def deployment_exists() -> bool:
    return http_ok(f"{prefect_api_url()}/deployments/name/{DEPLOYMENT}")


#: Where a user points Prefect at a database of their own (the second is the older name).
_DATABASE_URL_VARIABLES = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def _seed_prefect_database() -> None:
    """A new database of the servers' Prefect home starts as a copy of the migrated template, when there is
    one (cnn_train.flows.prefect_database). With a database URL of the user's in the environment nothing is
    copied; one set only in a Prefect profile leaves an unused copy in the home, which Prefect never opens."""
    from cnn_train.flows import prefect_database

    if not any(os.environ.get(name) for name in _DATABASE_URL_VARIABLES):
        prefect_database.seed(servers_prefect_home() / "prefect.db")


prefect_server = Service(
    name="prefect-server",
    command=lambda: [_bin("prefect"), "server", "start", "--host", bind_host(), "--port", str(prefect_port())],
    ready=lambda: http_ok(f"{prefect_api_url()}/health"),
    extra_env=lambda: {"PREFECT_UI_API_URL": _ui_api_url()} | _server_credentials(),
    port=prefect_port,
    port_variable="CNN_TRAIN_PREFECT_PORT",
    before_start=_seed_prefect_database,
)

mlflow_server = Service(
    name="mlflow-server",
    command=lambda: [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{project_root() / 'mlflow.db'}",
        "--artifacts-destination",
        str(default_artifact_root()),
        "--host",
        bind_host(),
        "--port",
        str(mlflow_port()),
        "--workers",
        "1",
        # Host-header and CORS checks keep MLflow's defaults (localhost and private addresses).
        *_mlflow_auth_app(),
    ],
    ready=lambda: http_ok(f"{mlflow_url()}/health"),
    # The default server spawns ~15 processes and 3 GB on 2 cores; these keep it near 0.5 GB.
    extra_env=lambda: {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | _server_credentials(),
    port=mlflow_port,
    port_variable="CNN_TRAIN_MLFLOW_PORT",
)

serve_process = Service(
    name="deployment-server",
    command=lambda: [sys.executable, "-m", "cnn_train.flows.serve"],
    ready=_deployment_served,
    extra_env=lambda: {
        "MLFLOW_TRACKING_URI": mlflow_url(),
        # Pick up triggered runs within 2 s instead of the default 10 s poll.
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        **heartbeat_environment(),
    },
)



def _worker_command() -> list[str]:
    from cnn_train.flows import worker

    return worker.worker_command(worker.concurrency_limit())


def _worker_polling() -> bool:
    from cnn_train.flows import worker

    return worker_process.pid() is not None and worker.worker_name() in worker.online_workers(
        worker.pool_name(), prefect_api_url()
    )


# `cnn-train up --worker`: this machine's worker on the work pool, instead of the serve process.
worker_process = Service(
    name="worker",
    command=_worker_command,
    ready=_worker_polling,
    extra_env=lambda: {
        "MLFLOW_TRACKING_URI": mlflow_url(),
        # Pick up triggered runs within 2 s instead of the default 10 s poll.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        **heartbeat_environment(),
    },
)

SERVICES = (prefect_server, mlflow_server, serve_process, worker_process)


def project_mlflow_server() -> str | None:
    """The project's MLflow server URL when ``cnn-train up`` started it and it answers."""
    if mlflow_server.pid() is None:
        return None
    return mlflow_url() if http_ok(f"{mlflow_url()}/health", timeout=1.0) else None


def status() -> dict[str, dict[str, object]]:
    return {
        service.name: {"pid": service.pid(), "ready": service.ready(), "log": str(service.log_file)}
        for service in SERVICES
    }


def status_json() -> str:
    return json.dumps(status(), indent=2)
