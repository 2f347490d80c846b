"""The local servers behind ``cnn-train up``: a Prefect server, an MLflow server, and the process
serving the ``cnn-train/default`` deployment (or this machine's worker); their ports, addresses and
credentials. Each is a detached process (cnn_train.flows.ops.detached), found again by a health check,
so ``up`` is idempotent."""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cnn_train.flows.ops import addresses
from cnn_train.flows.ops.detached import Service
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import (
    TRACKING_URI_BY_UP_ENV, default_artifact_root, heartbeat_environment, project_root, servers_prefect_home,
)

HOST = "127.0.0.1"
#: The addresses the servers may listen on (`cnn-train up --host`): this machine only, or every interface.
#: Clients here always use HOST, so one other interface alone would leave them unanswered.
BindHost = Literal["127.0.0.1", "0.0.0.0"]
BIND_HOST_ENV = "CNN_TRAIN_BIND_HOST"


def bind_host() -> str:
    return os.environ.get(BIND_HOST_ENV) or HOST


def _credentials():  # noqa: ANN202 - auth.Credentials | None
    from cnn_train.flows.ops import auth

    return auth.load_credentials()


def client_credentials() -> dict[str, str]:
    """The servers' credentials for every client cnn-train starts (none when none are configured)."""
    credentials = _credentials()
    return credentials.client_environment() if credentials else {}


def _server_credentials() -> dict[str, str]:
    credentials = _credentials()
    return credentials.server_environment() if credentials else {}


def _mlflow_server_credentials() -> dict[str, str]:
    """The MLflow server's credentials, its user database brought to them first (auth.sync_mlflow_admin)."""
    credentials = _credentials()
    if credentials is None:
        return {}
    from cnn_train.flows.ops import auth

    auth.sync_mlflow_admin(credentials)
    return credentials.server_environment()


def _mlflow_auth_app() -> list[str]:
    return ["--app-name", "basic-auth"] if _credentials() else []
DEPLOYMENT = "cnn-train/default"


def prefect_port() -> int:
    return _port(prefect_server, 4200)


def mlflow_port() -> int:
    return _port(mlflow_server, 5000)


class PortError(ExpectedFailure):
    """A port variable that holds no port."""


def check_port_variables() -> None:
    """Refuse a port variable that holds no port (:class:`PortError`), before any command or flow run reads it."""
    prefect_port(), mlflow_port()


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


def prefect_api_answers(api_url: str, *, timeout: float = 3.0) -> bool:
    return http_ok(f"{api_url.rstrip('/')}/health", timeout=timeout)


def prefect_api_refusal(api_url: str, *, timeout: float = 3.0) -> str | None:
    """Why a Prefect API that answers refuses this client, said with the fix, or None. Its health check
    answers anyone; an API call carries the credentials Prefect's client would (PREFECT_API_AUTH_STRING, or
    PREFECT_API_KEY), and a refused one ended every command on Prefect's 401 traceback."""
    import base64

    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    request = urllib.request.Request(f"{api_url.rstrip('/')}/admin/version")
    if settings.auth_string:
        secret = settings.auth_string.get_secret_value().encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(secret).decode()}")
    elif settings.key:
        request.add_header("Authorization", f"Bearer {settings.key.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - the configured API
            return None
    except urllib.error.HTTPError as error:
        if error.code != 401:
            return None  # any other answer is the server's to give again where the work meets it
    except (urllib.error.URLError, OSError):
        return None  # not answering is the health check's to say
    presented = "this client's credentials" if settings.auth_string or settings.key else "this client, which presents no credentials"
    return (
        f"the Prefect API at {api_url} refused {presented} (401 Unauthorized); set PREFECT_API_AUTH_STRING "
        "to the servers' user:password"
    )


def prefect_api_mistake(api_url: str, *, timeout: float = 3.0) -> str | None:
    """For a ``PREFECT_API_URL`` that does not answer: what is wrong with the address itself (no scheme, or
    the server's own address, the UI's, without ``/api``), or None when the fault is not in it."""
    if problem := addresses.api_url_problem("PREFECT_API_URL", api_url):
        return problem
    base = api_url.rstrip("/")
    if not base.endswith("/api") and prefect_api_answers(f"{base}/api", timeout=timeout):
        return f"PREFECT_API_URL {api_url} is the Prefect server's address, not its API's: set it to {base}/api"
    return None


def http_json(url: str, *, timeout: float = 2.0) -> object | None:
    """The JSON a GET of ``url`` answers (``{}`` for a body that is not JSON), or None when it does not
    answer with a success."""
    try:  # a malformed address (no scheme, a space, a port past 65535) raises as early as the Request
        request = urllib.request.Request(url)
        if credentials := _credentials():
            request.add_header("Authorization", credentials.basic_header())
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback only
            if not 200 <= response.status < 300:
                return None
            body = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return {}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def team_host() -> str | None:
    """The name or address teammates reach the servers by, when they listen beyond this machine: the best
    of :func:`addresses.machine_addresses` (``getfqdn()`` alone answered ``localhost`` without a DNS name)."""
    if bind_host() == HOST:
        return None
    return addresses.url_host(next(iter(addresses.machine_addresses()), socket.gethostname()))


def _ui_api_url() -> str:
    """Where the Prefect UI's browser finds the API: this machine's best address when others may browse it."""
    host = team_host()
    return f"http://{host}:{prefect_port()}/api" if host else prefect_api_url()


def _prefect_server_env() -> dict[str, str]:
    # A PREFECT_UI_API_URL of the user's (a name behind a proxy, say) wins over the one worked out here.
    return {"PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or _ui_api_url()} | _server_credentials()


def _mlflow_beyond_loopback() -> dict[str, str]:
    """On every interface MLflow's server is also called, and its UI opened, by this machine's names and
    addresses, which its guards refuse by default: the Host header (403 "Invalid Host header", against DNS
    rebinding) and the UI's own POSTs from such a page (403 "Cross-origin request blocked"). A value of
    the user's wins."""
    if bind_host() == HOST:
        return {}
    names = addresses.machine_addresses()
    ours = {
        addresses.ALLOWED_HOSTS_ENV: ",".join(addresses.allowed_host_patterns(names)),
        addresses.ALLOWED_ORIGINS_ENV: ",".join(addresses.allowed_origins(names, mlflow_port())),
    }
    return {name: value for name, value in ours.items() if not os.environ.get(name)}


def _deployment_served() -> bool:
    """The serve process runs and the deployment is its own: registered by it, and on no work pool (after
    `cnn-train up --worker` the serve process first takes it back from the pool)."""
    if serve_process.pid() is None:
        return False
    deployment = deployment_record()
    return (
        deployment is not None
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


def deployment_record() -> dict[str, Any] | None:
    """``cnn-train/default`` as the Prefect server holds it (status, work pool, registration times), or None."""
    deployment = http_json(f"{prefect_api_url()}/deployments/name/{DEPLOYMENT}")
    return deployment if isinstance(deployment, dict) else None


#: Where a user points Prefect at a database of their own (the second is the older name).
_DATABASE_URL_VARIABLES = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def _seed_prefect_database() -> None:
    """A new database of the servers' Prefect home starts as a copy of the migrated template, when there is
    one (cnn_train.flows.ops.prefect_database). With a database URL of the user's in the environment nothing is
    copied; one set only in a Prefect profile leaves an unused copy in the home, which Prefect never opens."""
    from cnn_train.flows.ops import prefect_database

    if not any(os.environ.get(name) for name in _DATABASE_URL_VARIABLES):
        prefect_database.seed(servers_prefect_home() / "prefect.db")


#: A service of this project's stack: its processes share the quiet environment and the bind address.
_service = functools.partial(Service, base_env=quiet_environment, host=bind_host)

prefect_server = _service(
    name="prefect-server",
    command=lambda: [_bin("prefect"), "server", "start", "--host", bind_host(), "--port", str(prefect_port())],
    ready=lambda: http_ok(f"{prefect_api_url()}/health"),
    extra_env=_prefect_server_env,
    port=prefect_port,
    port_variable="CNN_TRAIN_PREFECT_PORT",
    before_start=_seed_prefect_database,
)

def _ready_mlflow_store() -> None:
    from cnn_train.flows import tracking  # a new store's schema is made under its lock, as a run makes it

    tracking.ready_store(f"sqlite:///{project_root() / 'mlflow.db'}")


mlflow_server = _service(
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
        # Host-header and CORS checks keep MLflow's defaults, plus this machine's names on every interface.
        *_mlflow_auth_app(),
    ],
    ready=lambda: http_ok(f"{mlflow_url()}/health"),
    # The default server spawns ~15 processes and 3 GB on 2 cores; these keep it near 0.5 GB.
    extra_env=lambda: {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | _mlflow_server_credentials() | _mlflow_beyond_loopback(),
    port=mlflow_port,
    port_variable="CNN_TRAIN_MLFLOW_PORT",
    before_start=_ready_mlflow_store,
)


def _runs_flows(poll_variable: str) -> Callable[[], dict[str, str]]:
    """The environment of a process that runs the flow runs (the serve process, a worker): up's MLflow, a
    poll for triggered runs every 2 s instead of the default 10 s (its ``poll_variable``), heartbeats."""
    return lambda: {"MLFLOW_TRACKING_URI": mlflow_url(), TRACKING_URI_BY_UP_ENV: "1", poll_variable: "2", **heartbeat_environment()}


serve_process = _service(
    name="deployment-server",
    command=lambda: [sys.executable, "-m", "cnn_train.flows.ops.serve"],
    ready=_deployment_served,
    extra_env=_runs_flows("PREFECT_RUNNER_POLL_FREQUENCY"),
    before_stop=lambda pid: _interrupt_flow_runs(pid),
    runs_code=True,
)


def _interrupt_flow_runs(pid: int) -> None:
    from cnn_train.flows.ops import worker

    worker.interrupt_flow_runs(pid)


def _worker_command() -> list[str]:
    from cnn_train.flows.ops import worker

    return worker.worker_command(worker.concurrency_limit())


def _worker_polling() -> bool:
    from cnn_train.flows.ops import worker

    # With the Prefect server down the worker may live on, polling nothing: `status` said so with a traceback.
    return (
        worker_process.pid() is not None
        and prefect_api_answers(prefect_api_url(), timeout=1.0)
        and worker.worker_name() in worker.online_workers(worker.pool_name(), prefect_api_url())
    )


# `cnn-train up --worker`: this machine's worker on the work pool, instead of the serve process.
worker_process = _service(
    name="worker",
    command=_worker_command,
    ready=_worker_polling,
    extra_env=_runs_flows("PREFECT_WORKER_QUERY_SECONDS"),
    before_stop=_interrupt_flow_runs,
    runs_code=True,
)

SERVICES = (prefect_server, mlflow_server, serve_process, worker_process)


def project_mlflow_server() -> str | None:
    """The project's MLflow server URL when ``cnn-train up`` started it and it answers."""
    if mlflow_server.pid() is None:
        return None
    return mlflow_url() if http_ok(f"{mlflow_url()}/health", timeout=1.0) else None


def status() -> dict[str, dict[str, object]]:
    return {service.name: {"pid": service.pid(), "ready": service.ready(), "log": str(service.log_file), "port": service.port()
                           if service.port else None, "running_port": service.running_port(), "code_changed": service.code_changed()}
            for service in SERVICES}


def status_json() -> str:
    return json.dumps(status(), indent=2)
