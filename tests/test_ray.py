"""Sweeps on a Ray cluster started the standard way (`ray start`, token authentication on): joining it
by HOST:PORT and auto, the one-line errors, trials placed by a node's custom resource, and a trial
whose Ray worker is killed finishing once, resumed, in one MLflow child run.

The cluster is two `ray start` nodes on loopback, with their own temporary directory and home (so
`auto` and the token file find only this cluster) and their own process groups, which the module
stops by those group ids: `ray stop` would stop every Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cnn_train.flows.ray_cluster import parse_resources, ray_task_runner, worker_died
from cnn_train.flows.ray_join import RayClusterError, join_failure
from cnn_train.flows.sweep_flow import trial_key, validate_sweep
from cnn_train.flows.tuning.plan import validate_tune
from tests.local_stack import bare_env, flow_run_states, free_port

BIN = Path(sys.executable).parent
SMALL = ["--epochs", "1", "--sample-limit", "400", "--test-limit", "200", "--architecture", "dense"]
#: The custom resource only the second node advertises.
BOX = "cnn_gpu_box"


# --- fast: what is refused before Ray is asked -----------------------------------------------------


def _refused_in_one_line(address: str, message: str) -> None:
    with pytest.raises(RayClusterError, match=re.escape(message)) as caught:
        ray_task_runner(address)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("headnode", id="no-port"),
        pytest.param("ray://headnode", id="ray-client-no-port"),
        pytest.param("http://headnode:8265", id="dashboard-url"),
    ],
)
def test_an_address_that_is_not_host_port_is_refused(address: str) -> None:
    _refused_in_one_line(address, "--ray-address takes HOST:PORT")


@pytest.mark.parametrize("scheme", [pytest.param("", id="unreachable"), pytest.param("ray://", id="unreachable-client")])
def test_an_address_nothing_answers_at_is_refused(scheme: str) -> None:
    port = free_port()  # nothing listens on it
    _refused_in_one_line(f"{scheme}127.0.0.1:{port}", f"nothing answers at 127.0.0.1:{port} (Connection refused)")


#: How a Ray Client reports its head's failure: a header line over the proxy's traceback.
_PROXY_FAILURE = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File "ray/util/client/server/proxier.py", line 776, in Datapath\n'
    '    raise RuntimeError(\n'
    "RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err` on the head node\n"
)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(ConnectionAbortedError(_PROXY_FAILURE), "Initialization failure from server: RuntimeError: Proxy "
                     "failed to Connect to backend! Check `ray_client_server.err` on the head node", id="server-traceback"),
        pytest.param(ConnectionError("GCS refused\nmore detail"), "GCS refused", id="first-line"),
        pytest.param(ConnectionError(""), "ConnectionError", id="no-message"),
    ],
)
def test_a_failed_join_says_why_in_one_line(error: BaseException, reason: str) -> None:
    """A Ray Client's failure said only "Initialization failure from server:", the header of the reason."""
    message = str(join_failure("ray://10.0.0.5:10001", error))
    assert message == f"could not join the Ray cluster at ray://10.0.0.5:10001: {reason}"


@pytest.mark.parametrize(
    ("failures", "joined", "message"),
    [
        pytest.param([ConnectionAbortedError(_PROXY_FAILURE)], True, None, id="server-failed-to-start-once"),
        pytest.param([ConnectionAbortedError(_PROXY_FAILURE)] * 2, False, "Initialization failure from server: RuntimeError",
                     id="server-failed-to-start-twice"),
        pytest.param([ConnectionError("refused by the head")], False, "refused by the head", id="other-failure-not-retried"),
    ],
)
def test_a_ray_client_whose_server_failed_to_start_joins_with_a_second_client(monkeypatch, failures, joined, message):
    """The head's proxy starts a server per client; on a saturated head it missed its 30 s to answer, or died
    starting (twice in CI). Ray's join itself is replaced here: the second try is what is checked."""
    import ray
    from prefect_ray import RayTaskRunner

    left = list(failures)
    shutdowns = []

    def joining(runner):
        if runner._started:  # as Prefect's TaskRunner.__enter__
            raise RuntimeError("This task runner is already started")
        runner._started = True
        if left:
            raise left.pop(0)
        return runner

    monkeypatch.setattr(RayTaskRunner, "__enter__", joining)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        runner = ray_task_runner(f"ray://127.0.0.1:{head.getsockname()[1]}")
        if joined:
            assert runner.__enter__() is runner
        else:
            with pytest.raises(RayClusterError, match=re.escape(message)):
                runner.__enter__()
    assert len(shutdowns) == (1 if isinstance(failures[0], ConnectionAbortedError) else 0)


@pytest.mark.parametrize("outcome", ["started", "session-folder-not-writable"])
def test_a_new_local_ray_keeps_the_token_private_and_a_folder_it_cannot_write_is_one_line(monkeypatch, tmp_path, outcome):
    """As a non-root user: Ray left ~/.ray/auth_token 0644 (its GCS listens on every interface), and a Ray
    session folder of another account's under /tmp/ray ended the sweep in a PermissionError traceback. Ray's
    start is replaced here, writing the token as Ray does, or refused as the OS refuses."""
    from prefect_ray import RayTaskRunner

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    session = tmp_path / "ray" / "session_2026-12-07"

    def starting(runner):
        if outcome != "started":
            raise PermissionError(13, "Permission denied", str(session))
        # The token is written while the cluster starts, its GCS already listening: its folder keeps it private.
        assert oct(token.parent.stat().st_mode & 0o777) == "0o700"
        token.write_text("0" * 64)
        token.chmod(0o644)
        return runner

    monkeypatch.setattr(RayTaskRunner, "__enter__", starting)
    runner = ray_task_runner()
    if outcome == "started":
        assert runner.__enter__() is runner
        assert oct(token.stat().st_mode & 0o777) == "0o600"
    else:
        with pytest.raises(RayClusterError) as refused:
            runner.__enter__()
        assert str(refused.value) == (
            f"Ray could not start on this machine: this user cannot write {session} (permission denied; another "
            "account's Ray keeps its sessions there): set RAY_TMPDIR to a folder of yours"
        )


@pytest.mark.parametrize(("quiet", "shown"), [(True, False), (False, True)], ids=["quiet-command", "verbose-command"])
def test_a_trial_on_ray_is_as_quiet_as_the_command_that_started_it(quiet: bool, shown: bool) -> None:
    """A pyfunc plugin's trial on Ray printed MLflow's pickling advice once per trial on the terminal, which
    the command itself silences (flows/quiet.py): the filters were never set in Ray's worker processes."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s: %(message)s')\n"
        "from cnn_train.flows.ray_cluster import _in_trial\n"
        "advice = lambda: logging.getLogger('mlflow.pyfunc').warning('Passing a Python object as `python_model` ...')\n"
        f"_in_trial({{'MLFLOW_TRACKING_PASSWORD': 'pw'}}, {quiet}, advice)()\n"
        "import os; print('password set:', os.environ['MLFLOW_TRACKING_PASSWORD'] == 'pw')\n"
    )
    # A fresh process, as a Ray worker is: this one may have been quieted by an earlier test's command.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert ("Passing a Python object" in out) == shown, out
    assert "password set: True" in out


@pytest.mark.parametrize("validate", [pytest.param(validate_sweep, id="sweep"), pytest.param(validate_tune, id="tune")])
@pytest.mark.parametrize("address", [pytest.param("http://127.0.0.1:8265", id="dashboard-url"), pytest.param("", id="unreachable")])
def test_a_search_refuses_a_bad_ray_address_while_it_is_validated(validate, address: str) -> None:
    """Before its MLflow run and data prep: a search that failed at Ray's door left a FAILED parent run."""
    address = address or f"127.0.0.1:{free_port()}"
    with pytest.raises(RayClusterError, match="--ray-address takes|nothing answers at"):
        validate({"epochs": 1, "task_runner": "ray", "ray_address": address})


def test_the_sweep_command_refuses_a_bad_ray_address_before_its_flow_run(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    sweep = subprocess.run(
        [BIN / "cnn-train", "sweep", *SMALL, "--grid", "learning_rate=0.01,0.001", "--task-runner", "ray",
         "--ray-address", "http://127.0.0.1:8265"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert sweep.returncode == 2 and sweep.stdout == "", sweep.stdout + sweep.stderr  # a bad value, as --epochs 0
    assert sweep.stderr.startswith("cnn-train: --ray-address takes HOST:PORT") and sweep.stderr.count("\n") == 1, sweep.stderr


def _validating_auto(validate, tmp_path: Path, monkeypatch) -> RayClusterError:
    """``auto`` validated where Ray's temporary directory is ``tmp_path`` and Ray's scan of this machine's
    processes finds no cluster (other test modules' Rays run beside this one)."""
    import ray  # noqa: F401 (before its private module: importing that first leaves Ray half-initialised)
    import ray._private.services as ray_services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_services, "find_gcs_addresses", frozenset)
    with pytest.raises(RayClusterError) as caught:
        validate({"epochs": 1, "task_runner": "ray", "ray_address": "auto"})
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("validate", [pytest.param(validate_sweep, id="sweep"), pytest.param(validate_tune, id="tune")])
def test_auto_that_finds_no_cluster_is_refused_while_the_search_is_validated(validate, tmp_path, monkeypatch) -> None:
    """It was found out as the trials started, after the search's parent MLflow run and data prep."""
    assert str(_validating_auto(validate, tmp_path, monkeypatch)).startswith("--ray-address auto found no Ray cluster")


def test_auto_that_finds_a_stopped_cluster_names_its_address(tmp_path, monkeypatch) -> None:
    """A head that died without `ray stop` leaves its address recorded; Ray would wait minutes on it."""
    port = free_port()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")  # where `ray start` records it
    message = str(_validating_auto(validate_sweep, tmp_path, monkeypatch))
    assert message.startswith(f"--ray-address auto found the Ray cluster at 127.0.0.1:{port}"), message
    assert "nothing answers there (Connection refused)" in message


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param(["a100=1"], {"a100": 1.0}, id="one"),
        pytest.param(["a100=1", "fast_disk=0.5"], {"a100": 1.0, "fast_disk": 0.5}, id="two"),
        pytest.param(None, {}, id="none"),
    ],
)
def test_trial_resources_parse(items, expected) -> None:
    assert parse_resources(items) == expected


@pytest.mark.parametrize("item", ["a100", "a100=0", "a100=x", "=1"])
def test_bad_trial_resources_are_refused(item: str) -> None:
    expected = (
        "--ray-resource takes NAME=AMOUNT with a positive amount (a resource a node advertises with "
        f"`ray start --resources`, e.g. a100=1); got {item!r}"
    )
    with pytest.raises(RayClusterError, match=re.escape(expected)):
        parse_resources([item])


def _ray_error(name: str, *args: str) -> BaseException:
    import ray.exceptions

    return getattr(ray.exceptions, name)(*args)


@pytest.mark.parametrize(
    ("make_error", "died"),
    [
        pytest.param(lambda: _ray_error("WorkerCrashedError"), True, id="worker-crashed"),
        pytest.param(lambda: _ray_error("NodeDiedError", "node gone"), True, id="node-died"),
        # Inside a flow run ray.exceptions may have been executed twice: a class of the same name counts.
        pytest.param(lambda: type("WorkerCrashedError", (Exception,), {"__module__": "ray.exceptions"})(), True, id="second-copy"),
        pytest.param(lambda: ValueError("the trial's own bug"), False, id="task-failure"),
        pytest.param(lambda: _ray_error("TaskCancelledError"), False, id="cancelled"),
    ],
)
def test_a_dead_worker_is_told_from_a_failed_trial(make_error, died: bool) -> None:
    assert worker_died(make_error()) is died


def test_trials_get_the_commands_quiet_and_its_servers_credentials(monkeypatch) -> None:
    """Ray prints its workers' output on the driver's terminal: without the command's quiet there, every
    trial printed MLflow's "View run ... at:" line and its system-metrics INFO lines."""
    from cnn_train.flows import quiet
    from cnn_train.flows.ray_cluster import ray_task_runner

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "team-password")
    for name in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)
    quiet.quiet_libraries()  # what every cnn-train command does first
    runner = ray_task_runner()
    forwarded = runner.init_kwargs["runtime_env"]["env_vars"]
    assert "MLFLOW_TRACKING_PASSWORD" not in forwarded, "Ray logs the runtime environment (see the cluster test)"
    assert runner.credentials == {"MLFLOW_TRACKING_PASSWORD": "team-password"} == runner.duplicate().credentials
    assert forwarded["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert forwarded["MLFLOW_LOGGING_LEVEL"] == "WARNING"


def test_trial_key_depends_on_the_values_only() -> None:
    assert trial_key({"learning_rate": 0.001, "seed": 1}) == trial_key({"seed": 1, "learning_rate": 0.001})
    assert trial_key({"learning_rate": 0.001}) != trial_key({"learning_rate": 0.0003})


# --- slow: a real two-node cluster -----------------------------------------------------------------


@dataclass
class RayCluster:
    """Two `ray start` nodes on this machine; ``box_node`` is the one advertising :data:`BOX`."""

    root: Path
    token: str
    port: int
    client_port: int
    groups: list[int] = field(default_factory=list)
    box_node: str = ""

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ray_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return env | {"HOME": str(self.home), "RAY_TMPDIR": str(self.root), "RAY_USAGE_STATS_ENABLED": "0"} | extra

    def start(self, *args: str, **env: str) -> None:
        """`ray start ARGS` in a process group of its own; Ray's daemons stay in it after `ray start` returns.
        Ray gives a new node a fixed 30 s to register, which a saturated machine can miss: a second try."""
        for attempt in (1, 2):
            log = self.root / f"ray-start-{len(self.groups)}.log"
            with log.open("w") as out:
                process = subprocess.Popen(  # noqa: S603 - our own command
                    [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
                     "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *args],
                    env=self.ray_env(**env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
                self.groups.append(process.pid)
                if process.wait(timeout=180) == 0:
                    return
            _stop_groups([self.groups.pop()])
            assert attempt == 1 and "timed out during startup" in log.read_text(), log.read_text()[-3000:]

    def stop(self) -> None:
        _stop_groups(list(reversed(self.groups)))

    def nodes(self) -> dict[str, dict[str, float]]:
        """Each alive node's id and resources, as a driver with the token sees them."""
        script = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % self.address
        )
        done = subprocess.run(  # noqa: S603 - our own command
            [sys.executable, "-c", script], env=self.ray_env(RAY_AUTH_MODE="token"),
            capture_output=True, text=True, timeout=120, check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])


def _stop_groups(groups: list[int]) -> None:
    """SIGTERM to each process group, then SIGKILL to what is left of them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
            time.sleep(0.3)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """A head (token auth on, as `ray start --head` turns it on when ~/.ray/auth_token exists) and a
    second node advertising one BOX; Ray's socket paths must stay short, hence a /tmp directory."""
    root = Path(tempfile.mkdtemp(prefix="cnnray-", dir="/tmp"))
    token = uuid.uuid4().hex
    (root / "home" / ".ray").mkdir(parents=True)
    (root / "home" / ".ray" / "auth_token").write_text(token)
    ray_cluster = RayCluster(root, token, free_port(), free_port())
    try:
        # The head's Ray Client proxy gives the server it starts for each client 30 s to answer, which a
        # saturated 2-core machine missed once in CI ("Proxy failed to Connect to backend!").
        ray_cluster.start(
            "--head", "--port", str(ray_cluster.port), "--ray-client-server-port", str(ray_cluster.client_port),
            "--dashboard-port", str(free_port()), "--include-dashboard", "false",
            RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="180",
        )
        # A node that is not the head joins only with token mode on, as Ray documents.
        ray_cluster.start("--address", ray_cluster.address, "--resources", json.dumps({BOX: 1}), RAY_AUTH_MODE="token")
        nodes = ray_cluster.nodes()
        assert len(nodes) == 2, nodes
        ray_cluster.box_node = next(node for node, resources in nodes.items() if BOX in resources)
        yield ray_cluster
    finally:
        ray_cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sweep_env(mlflow_store: str, prefect_api_url: str, tmp_path: Path, cluster: RayCluster) -> dict[str, str]:
    """The environment of a user's shell on this machine: the module's stores, a home without any Ray token."""
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_store, "HOME": str(tmp_path / "home")}


def _sweep(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own command
        [str(BIN / "cnn-train"), "sweep", "--task-runner", "ray", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def _sweep_children(mlflow_store: str, output: str) -> tuple[str, list]:
    """The sweep's parent run id and its child runs, from the command's `best trial: VALUES, test
    accuracy A%, run RUN_ID` line."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    line = re.search(r"^best trial: \w+=\S+, test accuracy \d+\.\d\d%, run ([0-9a-f]{32})$", output, re.M)
    assert line is not None, output
    best = client.get_run(line.group(1))
    parent_id = best.data.tags["mlflow.parentRunId"]
    children = client.search_runs([best.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent_id, children


def _trial_task_runs(flow_run_id: str, prefect_api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith("trial")]


@pytest.mark.slow
def test_explicit_address_with_the_token_places_trials_on_the_node_with_the_resource(
    cluster, sweep_env, mlflow_store, prefect_api_url
):
    done = _sweep(
        sweep_env | {"RAY_AUTH_TOKEN": cluster.token},  # the token as Ray documents it, no RAY_AUTH_MODE
        "--ray-address", cluster.address, "--ray-resource", f"{BOX}=1", "--grid", "learning_rate=0.001,0.0003", *SMALL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = _sweep_children(mlflow_store, done.stdout)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # Both nodes have a free CPU; only the node with the resource may run a trial that needs it.
    assert [c.data.tags["ray.node_id"] for c in children] == [cluster.box_node] * 2
    # The driver's Prefect API reached the workers: their task runs are on the same server.
    flow_run_id = children[0].data.tags["prefect.flow_run_id"]
    assert sorted(r.state.name for r in _trial_task_runs(flow_run_id, prefect_api_url)) == ["Completed", "Completed"]


def _client_server_logs(cluster: RayCluster) -> str:
    """The tails of the head's Ray Client server logs, which say why a client's server failed to start."""
    logs = sorted(path for path in cluster.root.rglob("ray_client_server*") if path.is_file())
    return "".join(f"\n--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]) for log in logs)


#: A driver whose one task answers what its Ray worker sees of the credentials.
_CREDENTIALS_PROBE = """
import os, sys
from prefect import flow, task
from cnn_train.flows.ray_cluster import ray_task_runner

@task
def seen():
    return os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("PREFECT_API_AUTH_STRING")

@flow(task_runner=ray_task_runner(sys.argv[1]))
def probe():
    return seen.submit().result()

print("the trial saw", *probe())
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [pytest.param("", id="node"), pytest.param("ray://", id="ray-client")])
def test_trials_get_the_credentials_and_no_ray_log_holds_them(cluster, prefect_api_url, tmp_path, scheme):
    """They travelled in the job's runtime environment, which Ray's runtime-env agent (and, for a Ray Client,
    its proxy) logs on the cluster's nodes, where anyone reading the logs found the team's passwords."""
    password, auth = f"pw-{uuid.uuid4().hex}", f"team:{uuid.uuid4().hex}"
    address = f"ray://127.0.0.1:{cluster.client_port}" if scheme else cluster.address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path), "RAY_AUTH_TOKEN": cluster.token, "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_PASSWORD": password, "PREFECT_API_AUTH_STRING": auth,
    }
    probe = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, "-c", _CREDENTIALS_PROBE, address], env=env, capture_output=True, text=True, timeout=300,
    )
    assert f"the trial saw {password} {auth}" in probe.stdout, (
        probe.stdout[-2000:] + probe.stderr[-3000:] + _client_server_logs(cluster)
    )
    holding = [
        str(path) for path in cluster.root.rglob("*")
        if path.is_file() and not path.is_socket() and password.encode() in path.read_bytes()
    ]
    assert holding == []


@pytest.mark.slow
def test_auto_joins_the_cluster_started_on_this_machine(cluster, sweep_env, mlflow_store):
    # auto reads the address `ray start` left in Ray's temporary directory and the token in ~/.ray.
    env = sweep_env | {"HOME": str(cluster.home), "RAY_TMPDIR": str(cluster.root)}
    done = _sweep(env, "--ray-address", "auto", "--grid", "learning_rate=0.001", *SMALL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = _sweep_children(mlflow_store, done.stdout)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["ray.node_id"] in cluster.nodes()


@pytest.mark.slow
def test_a_missing_token_is_one_line_saying_how_to_give_it(cluster, sweep_env):
    # Ray retries its first call to the cluster for 20 s by default; the test does not need to wait that long.
    env = sweep_env | {"RAY_gcs_server_port_wait_time_s": "2"}
    done = _sweep(env, "--ray-address", cluster.address, "--grid", "learning_rate=0.001", *SMALL)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"cnn-train: the Ray cluster at {cluster.address} requires an authentication token and none was given: "
        "run `ray get-auth-token` on the cluster's head node and give its output to this machine as RAY_AUTH_TOKEN "
        "(or save it as ~/.ray/auth_token)"
    )


@pytest.mark.slow
def test_without_servers_ctrl_c_records_the_crash_and_trials_get_no_loopback_api(cluster, sweep_env, tmp_path):
    """No Prefect API configured: the driver's flow run is on the command's temporary server, which
    outlasts a terminal's Ctrl-C to record the crash (the server Prefect starts itself stopped with it, and
    the command retried it for minutes). A trial on an existing cluster may run on another machine, which
    cannot reach that server's loopback address: it is not given it, and records on a server of its own."""
    home = tmp_path / "prefect"
    env = {k: v for k, v in sweep_env.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "RAY_AUTH_TOKEN": cluster.token}
    args = ["--ray-address", cluster.address, "--grid", "learning_rate=0.001", "--epochs", "50",
            "--sample-limit", "2000", "--test-limit", "200", "--architecture", "cnn"]
    started_ms = int(time.time() * 1000)
    # A terminal's foreground job: a process group of its own, SIGINT at its default.
    sweep = subprocess.Popen(  # noqa: S603 - our own command
        # --verbose: a quiet command's trials drop the announcement of their server, the evidence read below.
        [str(BIN / "cnn-train"), "--verbose", "sweep", "--task-runner", "ray", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, process_group=0,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        for line in sweep.stdout:  # the trial trains on a Ray worker
            lines.append(line)
            if "train runs on" in line:
                break
        assert sweep.poll() is None, "".join(lines)[-3000:]
        os.killpg(sweep.pid, signal.SIGINT)
        output, _ = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 130, "".join(lines)[-2000:] + output[-3000:]
    assert flow_run_states(home, "cnn-train-sweep") == ["CRASHED"]
    # The sweep's run ends KILLED. Its trial on this existing cluster is cancelled too, but ended KILLED, FAILED
    # (the crash hook first) or, once in a CI run, FINISHED: its end is asserted on a local Ray
    # (tests/test_reliability.py), not here.
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cnn-train").experiment_id], f"attributes.start_time >= {started_ms}")
    assert {r.info.status for r in runs if r.data.tags["cnn_train.role"] == "sweep"} == {"KILLED"}
    # The trial's worker started a server of its own (Ray shows its lines as "(trial pid=N) ...").
    assert any("(trial pid=" in line and "Starting temporary server" in line for line in lines), "".join(lines)[-3000:]


def _trial_worker(groups: list[int]) -> int | None:
    """The pid of the Ray worker process running a trial, among the children of this cluster's raylets
    (a Ray worker leads a process group of its own)."""
    import psutil

    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] != "raylet" or os.getpgid(process.pid) not in groups:
                continue
            for child in process.children(recursive=True):
                if child.cmdline()[:1] == ["ray::trial"]:
                    return child.pid
        except (psutil.Error, ProcessLookupError):
            continue
    return None


@pytest.mark.slow
def test_a_trial_whose_worker_is_killed_finishes_once_resumed(cluster, sweep_env, mlflow_store, prefect_api_url):
    from mlflow import MlflowClient

    checkpoints = Path(os.environ["CNN_TRAIN_STATE_DIR"]) / "checkpoints"
    before = set(checkpoints.glob("*")) if checkpoints.exists() else set()
    env = sweep_env | {"RAY_AUTH_TOKEN": cluster.token}
    args = ["--ray-address", cluster.address, "--grid", "learning_rate=0.001", "--epochs", "3",
            "--sample-limit", "2000", "--test-limit", "200", "--architecture", "cnn"]
    sweep = subprocess.Popen(  # noqa: S603 - our own command
        [str(BIN / "cnn-train"), "sweep", "--task-runner", "ray", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Kill the trial's worker once it has checkpointed its first epoch.
        deadline = time.monotonic() + 300
        killed = None
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            started = [p for p in checkpoints.glob("*/progress.json") if p.parent not in before] if checkpoints.exists() else []
            if started and json.loads(started[0].read_text()) and (pid := _trial_worker(cluster.groups)):
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.2)
        stdout, stderr = sweep.communicate(timeout=400)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert killed is not None, "the trial finished before its worker could be killed"
    assert sweep.returncode == 0, stdout[-3000:] + stderr[-3000:]
    _, children = _sweep_children(mlflow_store, stdout)
    assert len(children) == 1, [c.info.run_id for c in children]
    child = children[0]
    assert child.info.status == "FINISHED"
    assert int(child.data.tags["cnn_train.resumed_from_epoch"]) >= 1
    history = MlflowClient(mlflow_store).get_metric_history(child.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    # Prefect shows the attempt that died Crashed, and the one that resumed Completed.
    states = sorted(r.state.name for r in _trial_task_runs(child.data.tags["prefect.flow_run_id"], prefect_api_url))
    assert states == ["Completed", "Crashed"]
