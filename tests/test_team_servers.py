"""Servers shared with a team (`cnn-train up --host 0.0.0.0`): refused without credentials; with them,
requests without credentials get 401 and cnn-train's own clients work. Then the worst fault for such
servers: the serve process and its flow-run process SIGKILLed together.

The real servers here listen on 127.0.0.1 (test traffic stays on this machine): configured credentials
are demanded on either address, and what 0.0.0.0 changes, the servers' command lines and the UI's API
address, is checked without starting them."""

from __future__ import annotations

import base64
import json
import re
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnn_train.flows.ops import addresses as machine
from cnn_train.flows.ops import auth, services
from tests.local_stack import bare_env, free_port
from tests.plugin_fixtures import backend_plugin_site

CLI = Path(sys.executable).with_name("cnn-train")
ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "team", "correct-horse-battery"


def test_host_beyond_loopback_is_refused_without_credentials(tmp_path):
    result = subprocess.run([CLI, "up", "--host", "0.0.0.0", "--no-trigger"], env=bare_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("cnn-train: --host 0.0.0.0 would let other machines reach both servers")
    assert auth.USERNAME_ENV in line and "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "run").exists(), "nothing may start"


@pytest.mark.parametrize(
    ("mode", "content", "problem"),
    [
        (0o644, "username=team\npassword=correct-horse-battery\n", "is readable by others (mode 0644)"),
        (0o600, "username=team\n", "must hold two lines"),
        (0o600, "username=team\npassword=short\n", "at least 12 characters"),
    ],
    ids=["world-readable", "no-password", "short-password"],
)
def test_a_credentials_file_is_refused_with_the_reason(tmp_path, monkeypatch, mode, content, problem):
    path = tmp_path / "auth"
    path.write_text(content)
    path.chmod(mode)
    monkeypatch.setenv(auth.FILE_ENV, str(path))
    with pytest.raises(auth.AuthError, match=re.escape(problem)):
        auth.require_for_host("0.0.0.0")


def test_a_credentials_file_named_but_missing_is_refused(tmp_path, monkeypatch):
    """The servers started without credentials, on loopback without a word, when the named file was a typo."""
    for name in (auth.USERNAME_ENV, auth.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(auth.FILE_ENV, str(tmp_path / "auht"))
    with pytest.raises(auth.AuthError, match=re.escape(f"{auth.FILE_ENV}={tmp_path / 'auht'} is no file: create it")):
        auth.load_credentials()


def test_a_blank_user_name_in_the_environment_is_refused(monkeypatch):
    """The file's blank name was refused; the environment's was taken, and MLflow made a user ' ' its admin."""
    monkeypatch.setenv(auth.USERNAME_ENV, "  ")
    monkeypatch.setenv(auth.PASSWORD_ENV, PASSWORD)
    with pytest.raises(auth.AuthError, match="the user name must hold a character other than spaces"):
        auth.require_for_host("0.0.0.0")


@pytest.mark.filterwarnings("ignore::DeprecationWarning:alembic")  # this test's own store, migrated as MLflow does
def test_mlflows_admin_follows_the_teams_credentials(tmp_path, monkeypatch):
    """MLflow makes its admin once: a new password was refused by MLflow alone (`up` then died on a 401 traceback),
    and a new user name left the old one an admin. A user added by hand in MLflow stays."""
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))
    auth.sync_mlflow_admin(auth.Credentials("alice", "first-password-1"))  # imports the store quietly, first
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{tmp_path / 'mlflow-auth.db'}")
    store.create_user("carol", "carols-own-password", is_admin=False)
    auth.sync_mlflow_admin(auth.Credentials("alice", "second-password-2"))
    assert store.authenticate_user("alice", "second-password-2") and not store.authenticate_user("alice", "first-password-1")
    auth.sync_mlflow_admin(auth.Credentials("bob", "second-password-2"))
    assert {(user.username, user.is_admin) for user in store.list_users()} == {("bob", True), ("carol", False)}
    for name in ("mlflow-auth.db", "mlflow-auth.admin"):  # password hashes, and who the admin is: the owner's only
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(auth.mlflow_auth_config().stat().st_mode) == 0o600


@pytest.mark.parametrize("store", ["projects", "elsewhere"])
def test_up_with_credentials_keeps_the_projects_tracking_data_to_its_owner(tmp_path, monkeypatch, store):
    """With credentials on, another account got 401 from both servers yet read mlflow.db (0644) itself."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / ".state"))
    if store == "elsewhere":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").touch(mode=0o644)
    (tmp_path / "mlartifacts").mkdir(mode=0o755)
    (tmp_path / ".state").mkdir(mode=0o755)
    for path in (tmp_path / "mlflow.db", tmp_path / "mlartifacts", tmp_path / ".state"):
        path.chmod(path.stat().st_mode | 0o044)  # as a 0022 umask leaves them, whatever this process's umask
    private = [tmp_path / ".state"] + ([tmp_path / "mlflow.db", tmp_path / "mlartifacts"] if store == "projects" else [])
    assert auth.keep_project_data_private() == private
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "mlflow.db", tmp_path / "mlartifacts", tmp_path / ".state")}
    assert modes == ({"mlflow.db": 0o600, "mlartifacts": 0o700, ".state": 0o700} if store == "projects" else
                     {"mlflow.db": 0o644, "mlartifacts": 0o755, ".state": 0o700})
    assert auth.keep_project_data_private() == []  # already private: nothing to say
    fresh = tmp_path / "fresh"  # a new checkout: what the servers would make with the umask's modes is made private first
    fresh.mkdir()
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(fresh))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(fresh / ".state"))
    assert auth.keep_project_data_private() == [fresh / ".state"]  # made as the umask says as the state was first read
    made = {path.name: stat.S_IMODE(path.stat().st_mode) for path in fresh.iterdir()}
    assert made == ({"mlflow.db": 0o600, "mlartifacts": 0o700, ".state": 0o700} if store == "projects" else {".state": 0o700})
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / ".state"))
    monkeypatch.setenv(auth.USERNAME_ENV, USER)
    monkeypatch.setenv(auth.PASSWORD_ENV, PASSWORD)
    (tmp_path / ".state").chmod(0o755)
    monkeypatch.setattr("cnn_train.flows.ops.launcher.up", lambda **_: 0)  # the servers themselves are not this test's
    said = CliRunner().invoke(app, ["up", "--no-trigger"])
    assert said.output == f"{tmp_path / '.state'}: now readable by this user only, as the servers' credentials ask\n"


def test_credentials_from_a_private_file_reach_every_client(tmp_path, monkeypatch):
    path = tmp_path / "auth"
    path.write_text(f"# for the team\nusername={USER}\npassword={PASSWORD}\n")
    path.chmod(0o600)
    monkeypatch.setenv(auth.FILE_ENV, str(path))
    credentials = auth.require_for_host("0.0.0.0")
    assert credentials.client_environment() == {
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "PREFECT_API_AUTH_STRING": f"{USER}:{PASSWORD}",
    }
    assert PASSWORD not in repr(credentials)


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "0.0.0.0"])
def test_the_host_reaches_both_servers_command_lines(monkeypatch, bind_host):
    monkeypatch.setenv(services.BIND_HOST_ENV, bind_host)
    for server in (services.prefect_server, services.mlflow_server):
        command = server.command()
        assert command[command.index("--host") + 1] == bind_host, server.name


@pytest.mark.parametrize(
    ("addresses", "ui_host"),
    [
        pytest.param(["gpu-box.example.com", "192.0.2.2", "vm"], "gpu-box.example.com", id="a-dns-name"),
        pytest.param(["192.0.2.2", "fd00::2", "vm"], "192.0.2.2", id="no-dns-name-an-address"),
        pytest.param(["fd00::2"], "[fd00::2]", id="ipv6-only"),
    ],
)
def test_on_every_interface_the_prefect_ui_finds_its_api_by_this_machines_address(monkeypatch, tmp_path, addresses, ui_host):
    """Before, socket.getfqdn() alone: 'localhost' on a machine without a DNS name, so a teammate's browser
    called its own machine."""
    monkeypatch.setenv("CNN_TRAIN_PREFECT_PORT", "4321")
    for name in (auth.USERNAME_ENV, auth.PASSWORD_ENV, "PREFECT_UI_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(auth.FILE_ENV, raising=False)
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))  # no credentials file there
    monkeypatch.setattr(machine, "machine_addresses", lambda: addresses)
    monkeypatch.delenv(services.BIND_HOST_ENV, raising=False)
    assert services.prefect_server.extra_env()["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    monkeypatch.setenv(services.BIND_HOST_ENV, "0.0.0.0")
    assert services.prefect_server.extra_env()["PREFECT_UI_API_URL"] == f"http://{ui_host}:4321/api"
    monkeypatch.setenv("PREFECT_UI_API_URL", "https://prefect.team.example/api")  # the user's own wins
    assert services.prefect_server.extra_env()["PREFECT_UI_API_URL"] == "https://prefect.team.example/api"


def test_this_machines_addresses_leave_out_loopback_and_link_local():
    addresses = machine.machine_addresses()
    assert not {"127.0.0.1", "::1", "localhost"} & set(addresses)
    assert not any(a.startswith("fe80") for a in addresses)


@pytest.mark.parametrize(
    ("host", "origin", "let_through"),
    [
        pytest.param("192.0.2.2:5678", "http://192.0.2.2:5678", True, id="a-public-interface-address"),
        pytest.param("[fd00::2]:5678", "http://[fd00::2]:5678", True, id="ipv6-with-port"),
        pytest.param("[fd00::2]", "https://[fd00::2]:5678", True, id="ipv6"),
        pytest.param("vm:5678", "https://vm:5678", True, id="the-host-name"),
        pytest.param("localhost:5678", "http://localhost:5678", True, id="mlflows-defaults-kept"),
        pytest.param("evil.example.com:5678", "http://evil.example.com", False, id="another-name"),
        pytest.param("10.1.2.4:5678", "http://192.0.2.2:8080", False, id="origin-on-another-port"),
    ],
)
def test_on_every_interface_mlflows_guards_let_this_machines_names_through(monkeypatch, host, origin, let_through):
    """Through MLflow's own Host matcher and CORS decision. Before, a teammate calling http://vm:5000 or the
    machine's public address got 403 'Invalid Host header', and the MLflow UI opened there had its own
    POSTs (the runs tables' search) refused with 403 'Cross-origin request blocked'."""
    from mlflow.server.security_utils import is_allowed_host_header, should_block_cors_request

    monkeypatch.setattr(machine, "machine_addresses", lambda: ["192.0.2.2", "fd00::2", "vm"])
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", "5678")
    for name in (machine.ALLOWED_HOSTS_ENV, machine.ALLOWED_ORIGINS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(services.BIND_HOST_ENV, "0.0.0.0")
    env = services.mlflow_server.extra_env()
    # A private address passes the Host guard by MLflow's defaults; its row is about the origin's port.
    assert is_allowed_host_header(env[machine.ALLOWED_HOSTS_ENV].split(","), host) is (let_through or host.startswith("10."))
    assert should_block_cors_request(origin, "POST", env[machine.ALLOWED_ORIGINS_ENV].split(",")) is not let_through


def test_a_server_elsewhere_that_does_not_answer_is_not_for_up_to_start(monkeypatch):
    """A teammate was told to `cnn-train up`, which would start a second, empty server on their machine."""
    monkeypatch.setattr(machine, "machine_addresses", lambda: ["192.0.2.2", "vm"])
    urls = ["http://127.0.0.1:5000", "http://localhost:4200/api", "http://192.0.2.2:5000", "http://gpu-box.example.com:4200/api"]
    assert {url: machine.start_hint(url, "start it with `cnn-train up`") for url in urls} == {
        **dict.fromkeys(urls[:3], "start it with `cnn-train up`"),  # loopback, or this machine's own address
        urls[3]: "check that it runs on gpu-box.example.com and that this machine reaches it",
    }


@pytest.mark.parametrize(
    ("bind_host", "users"), [("127.0.0.1", None), ("0.0.0.0", "mlflow.team.example")], ids=["loopback", "the-users-own"]
)
def test_mlflows_allowed_hosts_are_left_alone(monkeypatch, bind_host, users):
    monkeypatch.setenv(services.BIND_HOST_ENV, bind_host)
    if users:
        monkeypatch.setenv(machine.ALLOWED_HOSTS_ENV, users)
    else:
        monkeypatch.delenv(machine.ALLOWED_HOSTS_ENV, raising=False)
    env = services.mlflow_server.extra_env()
    assert machine.ALLOWED_HOSTS_ENV not in env
    assert (machine.ALLOWED_ORIGINS_ENV in env) is (bind_host != "127.0.0.1")  # only the user's hosts were given


# --- real servers ----------------------------------------------------------------------------------


class Team:
    def __init__(self, tmp_path: Path, real_data: Path) -> None:
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.env = bare_env(tmp_path) | {
            "CNN_TRAIN_PREFECT_PORT": str(self.prefect_port),
            "CNN_TRAIN_MLFLOW_PORT": str(self.mlflow_port),
            "CNN_TRAIN_DATA_DIR": str(real_data),
            auth.USERNAME_ENV: USER,
            auth.PASSWORD_ENV: PASSWORD,
            # MLflow heartbeat every 2 s: a killed run is stale after 12 s.
            "CNN_TRAIN_HEARTBEAT_SECONDS": "2",
            # The served flow runs may train with the paced torch backend, registered as any plugin is.
            "PYTHONPATH": os.pathsep.join(
                [str(backend_plugin_site(tmp_path / "site", "paced-torch", "tests.plugin_fixtures:PacedBackend")), str(ROOT)]
            ),
        }
        self.state = tmp_path / "state"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = self.env | self.client_env()
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)

    def client_env(self) -> dict[str, str]:
        return auth.Credentials(USER, PASSWORD).client_environment() | {"PREFECT_API_URL": self.prefect_api}


@pytest.fixture(scope="module")
def team(tmp_path_factory, real_fashion_mnist_dir) -> Iterator[Team]:
    team = Team(tmp_path_factory.mktemp("team"), real_fashion_mnist_dir)
    started = team.cli("up", "--no-trigger", timeout=900)  # on 127.0.0.1: see the module's docstring
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield team
    finally:
        team.cli("down", timeout=180)


def _status(url: str, *, method: str = "GET", authorized: bool = False) -> int:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    if authorized:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _trigger(team: Team, parameters: dict) -> subprocess.CompletedProcess[str]:
    return team.python(
        "from cnn_train.flows.ops import launcher\n"
        f"raise SystemExit(launcher.trigger_and_watch(watch_timeout=1200, echo=print, parameters={parameters!r}))"
    )


@pytest.mark.slow
def test_shared_servers_demand_credentials_and_a_run_completes(team):
    prefect_flows, mlflow_search = f"{team.prefect_api}/flows/filter", f"{team.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert (_status(prefect_flows, method="POST"), _status(mlflow_search)) == (401, 401)
    assert (_status(prefect_flows, method="POST", authorized=True), _status(mlflow_search, authorized=True)) == (200, 200)
    result = _trigger(team, {"epochs": 1, "sample_limit": 2000, "test_limit": 500, "compare_dense": False})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "flow run state: Completed" in result.stdout and "test accuracy:" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("given", "line"),
    [
        pytest.param(
            {"PREFECT_API_AUTH_STRING": f"{USER}:not-the-password"},
            "the Prefect API at {prefect} refused this client's credentials (401 Unauthorized); "
            "set PREFECT_API_AUTH_STRING to the servers' user:password",
            id="prefect-wrong-password",
        ),
        pytest.param(
            {"PREFECT_API_AUTH_STRING": None},
            "the Prefect API at {prefect} refused this client, which presents no credentials (401 Unauthorized); "
            "set PREFECT_API_AUTH_STRING to the servers' user:password",
            id="prefect-none",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_PASSWORD": "not-the-password"},
            "MLflow tracking server {mlflow} refused this client's credentials (401 Unauthorized); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the servers' user and password",
            id="mlflow-wrong-password",
        ),
    ],
)
def test_a_teammates_refused_credentials_are_one_line_before_anything_runs(team, tmp_path, given, line):
    """A teammate's machine: no credentials file, the client variables only. Before, Prefect's 401 ended the
    command on a traceback (its health check answers anyone), and MLflow's failed a recorded flow run."""
    env = bare_env(tmp_path) | team.client_env() | {"MLFLOW_TRACKING_URI": team.mlflow, "CNN_TRAIN_DATA_DIR": team.env["CNN_TRAIN_DATA_DIR"]}
    for name, value in given.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    result = subprocess.run([CLI, "run", "--epochs", "1", "--sample-limit", "300"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines() == ["cnn-train: " + line.format(prefect=team.prefect_api, mlflow=team.mlflow)]
    assert "Traceback" not in result.stdout and "epoch 1/1" not in result.stdout


@pytest.mark.slow
def test_status_says_the_prefect_api_refuses_this_shell_instead_of_a_server_not_answering(team):
    """A shell of the machine without the credentials `up` was given: `status` said "deployment-server:
    started, not answering" of a serve process that was serving."""
    shell = {name: value for name, value in team.env.items() if name not in (auth.USERNAME_ENV, auth.PASSWORD_ENV)}
    refused = subprocess.run([CLI, "status"], env=shell, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 0, refused.stdout + refused.stderr
    lines = refused.stdout.splitlines()
    assert any(line.startswith("prefect-server: ready") for line in lines), lines
    assert any(line.startswith("deployment-server: started, ready or not: the Prefect API would not tell this shell")
               for line in lines), lines
    assert (f"the Prefect API at {team.prefect_api} refused this client, which presents no credentials (401 Unauthorized); "
            "set PREFECT_API_AUTH_STRING to the servers' user:password") in lines
    accepted = team.cli("status", "--json", timeout=120)
    report = json.loads(accepted.stdout)
    assert report["prefect_api_refusal"] is None and report["servers"]["deployment-server"]["ready"], report


def _flow_run_process(flow_run_id: str) -> int | None:
    import psutil

    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                return process.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_sigkill_of_serve_and_flow_run_process_ends_both_runs(team, monkeypatch):
    from mlflow import MlflowClient

    from cnn_train.flows import crashes

    for name, value in team.client_env().items():
        monkeypatch.setenv(name, value)
    started = team.python(
        "from prefect.deployments import run_deployment\n"
        "print(run_deployment('cnn-train/default', timeout=0, parameters="
        # Epochs that rest a second each (tests.plugin_fixtures.PacedBackend): the run outlasts the wait
        # below on any CPU without keeping a core busy through it (the torch backend's 30 epochs did).
        "{'backend': 'paced-torch', 'epochs': 1000, 'sample_limit': 600, 'test_limit': 100, 'compare_dense': False}).id)"
    )
    assert started.returncode == 0, started.stderr[-3000:]
    flow_run_id = started.stdout.strip().splitlines()[-1]
    client = MlflowClient(team.mlflow)
    deadline = time.monotonic() + 600
    run = None
    while run is None or not client.get_metric_history(run.info.run_id, "val_accuracy"):
        assert time.monotonic() < deadline, "the run never logged an epoch"
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
        )
        run = runs[0] if runs else None
        time.sleep(1)
    time.sleep(crashes.HEARTBEAT_SECONDS + 5)  # a Prefect heartbeat has been sent
    serve_pid = int((team.state / "run" / "deployment-server.pid").read_text())
    flow_pid = _flow_run_process(flow_run_id)
    assert flow_pid is not None, f"no process runs flow run {flow_run_id} any more"
    os.kill(serve_pid, signal.SIGKILL)
    os.kill(flow_pid, signal.SIGKILL)
    killed = time.monotonic()

    report = team.cli("doctor", timeout=300)
    reported_after = time.monotonic() - killed
    assert "FAIL deployment: the serve process of cnn-train/default" in report.stdout, report.stdout
    assert "FAIL flow runs: 1 flow run(s) Running without a process: " in report.stdout, report.stdout
    assert flow_run_id in report.stdout

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team.prefect_api}), get_client(sync_client=True) as prefect:
        while (state := prefect.read_flow_run(flow_run_id).state).type.value == "RUNNING":
            assert time.monotonic() - killed < crashes.ZOMBIE_AFTER_SECONDS + 120, "Prefect never crashed the flow run"
            time.sleep(2)
    crashed_after = time.monotonic() - killed
    assert state.type.value == "CRASHED" and crashes.CRASH_MESSAGE in state.message

    recovered = team.cli("up", "--no-trigger", timeout=600)  # what a user does next: serve again
    assert recovered.returncode == 0, recovered.stdout[-3000:] + recovered.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    failed_after = time.monotonic() - killed
    assert run.info.status == "FAILED", recovered.stdout
    print(f"doctor reported both {reported_after:.0f} s after the kill; Prefect Crashed after {crashed_after:.0f} s "
          f"(automation, no cnn-train process running); MLflow FAILED after {failed_after:.0f} s (by `cnn-train up`)")


def test_a_port_variable_that_moves_a_running_server_is_refused_and_status_says_where_it_runs(tmp_path, monkeypatch):
    """With its servers up on one port, `CNN_TRAIN_PREFECT_PORT=<another account's server> cnn-train up` took the
    live pid for that server, waited 300 s for a serve process, and left the Prefect profile pointing there;
    `status` called the other server this project's, "ready, pid N"."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app
    from cnn_train.flows.ops import launcher

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # this project's server, on 47142
    try:
        services.prefect_server.pid_file.parent.mkdir(parents=True)
        services.prefect_server.pid_file.write_text(str(stand_in.pid))
        services.prefect_server.port_file.write_text("47142")
        launcher.check_same_port(services.prefect_server)  # the port it runs on: nothing to say
        monkeypatch.setenv("CNN_TRAIN_PREFECT_PORT", str(free_port()))
        asked = services.prefect_port()
        with pytest.raises(launcher.RestartNeededError) as refused:
            launcher.check_same_port(services.prefect_server)
        assert str(refused.value) == (
            f"prefect-server of this project runs on port 47142 (pid {stand_in.pid}), not on {asked} that "
            "CNN_TRAIN_PREFECT_PORT asks for: unset it to use that server, or `cnn-train down` first to move it"
        )
        status = CliRunner().invoke(app, ["status"])
        assert f"prefect-server: runs on port 47142, not on {asked} that this shell asks for (nothing answers there), pid {stand_in.pid} " in status.output
        # Every other command too: with the MLflow port moved so, a `run` logged into another account's store.
        runs = CliRunner().invoke(app, ["runs"])
        assert (runs.exit_code, runs.output) == (2, f"cnn-train: {refused.value}\n")
    finally:
        stand_in.kill()
        stand_in.wait()


@pytest.mark.parametrize(
    ("running", "asked", "refused"),
    [("127.0.0.1", "0.0.0.0", True), ("0.0.0.0", "0.0.0.0", False), ("0.0.0.0", "127.0.0.1", False)],
    ids=["loopback-then-every-interface", "same-host", "every-interface-answers-on-loopback-too"],
)
def test_up_over_running_servers_on_another_host_says_to_restart_them(tmp_path, monkeypatch, running, asked, refused):
    """`up --host 0.0.0.0` over servers up had started on 127.0.0.1 printed the addresses teammates use, where
    nothing listened: the servers stayed on loopback, without credentials."""
    from cnn_train.flows.ops import launcher

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))
    monkeypatch.setenv(services.BIND_HOST_ENV, asked)
    # A process whose command line is a server's as up started it: what check_same_host reads.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--host", running])
    try:
        services.prefect_server.pid_file.parent.mkdir(parents=True)
        services.prefect_server.pid_file.write_text(str(stand_in.pid))
        if refused:
            with pytest.raises(launcher.RestartNeededError, match=re.escape(
                f"prefect-server already runs on {running}, not {asked}: `cnn-train down`, then `cnn-train up --host {asked}`"
            )):
                launcher.check_same_host(services.prefect_server)
        else:
            launcher.check_same_host(services.prefect_server)
        launcher.check_same_host(services.mlflow_server)  # not running: nothing to say
    finally:
        stand_in.kill()
        stand_in.wait()
