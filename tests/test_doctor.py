"""`cnn-train doctor` tells what is missing: the Prefect server, whatever serves the deployment,
the MLflow server, the dataset."""

from __future__ import annotations

import os
import time
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnn_train.flows.cli import app
from cnn_train.flows.ops import doctor


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_missing_prefect_server_is_reported():
    finding = doctor.check_prefect_server(f"{_dead_url()}/api")
    assert not finding.ok
    assert "does not answer" in finding.detail and "cnn-train up" in finding.fix


@pytest.mark.parametrize(
    ("given", "says"),
    [
        pytest.param("{server}", "PREFECT_API_URL {server} is the Prefect server's address, not its API's: set it to {server}/api",
                     id="server-address-without-api"),
        pytest.param("{server}/", "PREFECT_API_URL {server}/ is the Prefect server's address, not its API's: set it to {server}/api",
                     id="with-a-trailing-slash"),
        pytest.param("{bare}/api", "PREFECT_API_URL '{bare}/api' is no http:// or https:// address (did you mean http://{bare}/api?)",
                     id="no-scheme"),
    ],
)
def test_a_prefect_api_url_that_is_the_wrong_address_says_the_right_one(prefect_api_url, given, says):
    server = prefect_api_url.removesuffix("/api")
    names = {"server": server, "bare": server.removeprefix("http://")}
    finding = doctor.check_prefect_server(given.format(**names))
    assert (finding.ok, finding.detail, finding.fix) == (False, says.format(**names), "")


#: Each raised from deep in urllib or Prefect's settings, a traceback.
MALFORMED_API_URLS = {
    "other-scheme": ("ftp://x/api", "is no http:// or https:// address"),
    "no-host": ("http:///api", "is not a valid address: give http://HOST:PORT/api, without spaces"),
    "trailing-space": ("http://127.0.0.1:4200/api ", "is not a valid address: give http://HOST:PORT/api, without spaces"),
    "port-past-65535": ("http://127.0.0.1:99999/api", "is not a valid address: Port out of range 0-65535"),
    "bracket-left-open": ("http://[::1/api", "is not a valid address: Invalid IPv6 URL"),
}


@pytest.mark.parametrize(("given", "says"), MALFORMED_API_URLS.values(), ids=MALFORMED_API_URLS)
def test_a_malformed_prefect_api_url_says_what_is_wrong_with_it(given, says):
    finding = doctor.check_prefect_server(given)
    assert (finding.ok, finding.detail, finding.fix) == (False, f"PREFECT_API_URL {given!r} {says}", "")


def test_no_prefect_api_configured_is_reported():
    finding = doctor.check_prefect_server(None)
    assert not finding.ok and "no PREFECT_API_URL" in finding.detail


def test_missing_mlflow_server_is_reported():
    finding = doctor.check_tracking(_dead_url())
    assert not finding.ok
    assert "is not reachable" in finding.detail and "cnn-train up" in finding.detail


@pytest.mark.parametrize("variable_set", [False, True], ids=["servers-mlflow", "users-own-mlflow-uri"])
def test_a_dead_mlflow_server_of_up_is_not_the_fallback_store(tmp_path, monkeypatch, variable_set):
    """Its process killed, the check resolved to mlflow.db and said ok while every served run failed."""
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if variable_set:  # the user's own store: what up started is not what this shell uses
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    services.mlflow_server.pid_file.parent.mkdir(parents=True)
    services.mlflow_server.pid_file.write_text(str(dead.pid))
    finding = doctor.check_tracking(f"sqlite:///{tmp_path / ('mine.db' if variable_set else 'mlflow.db')}")
    assert finding.ok is variable_set, finding
    if not variable_set:
        assert finding.detail.startswith("the MLflow server `cnn-train up` started is not running (its log: ")
        assert finding.fix == "run `cnn-train up --no-trigger`"


def test_missing_dataset_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_DATA_DIR", str(tmp_path))
    finding = doctor.check_dataset()
    assert not finding.ok
    assert "train-images-idx3-ubyte.gz" in finding.detail


@pytest.mark.parametrize(("name", "said"), [("missing", "does not exist; name the folder"), ("a-file", "is a file; name the folder")])
def test_a_data_dir_that_is_no_folder_is_said_as_a_run_says_it(tmp_path, name, said):
    from cnn_train.flows.params import ParameterError, validate_parameters

    (tmp_path / "a-file").write_text("")
    finding = doctor.check_dataset(tmp_path / name)
    with pytest.raises(ParameterError) as refused:
        validate_parameters(data_dir=str(tmp_path / name))
    assert not finding.ok and finding.detail == str(refused.value)
    assert finding.detail.startswith(f"data_dir: {tmp_path / name} {said}")
    assert finding.detail.endswith(", or leave it empty to search the usual places")


def test_present_dataset_is_ok(real_fashion_mnist_dir):
    finding = doctor.check_dataset(real_fashion_mnist_dir)
    assert finding.ok and str(real_fashion_mnist_dir) in finding.detail


@pytest.mark.slow
def test_deployment_not_deployed_then_not_served(prefect_api_url):
    missing = doctor.check_deployment(prefect_api_url, name="cnn-train/doctor-test")
    assert not missing.ok and "is not deployed" in missing.detail

    from cnn_train.flows.train_flow import cnn_train

    # Registered with the server but with nothing polling for its runs, as after a dead serve process.
    cnn_train.to_deployment(name="doctor-test").apply()
    unserved = doctor.check_deployment(prefect_api_url, name="cnn-train/doctor-test")
    assert not unserved.ok
    assert "exists but nothing serves it" in unserved.detail and "cnn-train up" in unserved.fix


@pytest.mark.slow
def test_doctor_command_exit_code_and_lines(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{_dead_url()}/api",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CNN_TRAIN_DATA_DIR": str(tmp_path),
        "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run([Path(sys.executable).with_name("cnn-train"), "doctor"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL prefect server:") for line in lines)
    assert any(line.startswith("FAIL deployment:") for line in lines)
    assert any(line.startswith("FAIL dataset:") for line in lines)
    assert any(line.startswith("ok   mlflow:") for line in lines)


#: What a run leaves when MLflow did not answer at its end, written by a process that then exits: an
#: epoch's metric and the run's end.
_LEAVE_A_SPOOL = """
import sys
from cnn_train.flows import tracking
spool = tracking.Spool(sys.argv[1], uri=sys.argv[2])
spool.append("batch", {"metrics": [["val_accuracy", 0.8, 1_700_000_000_000, 1]]})
spool.append("end", {"status": "FINISHED", "end_time": 1_700_000_001_000})
"""


def _spooled_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A store with one run, and this test's state dir; returns the store's URI and the run's id."""
    from mlflow import MlflowClient

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return store, MlflowClient(store).create_run(MlflowClient(store).create_experiment("spooled")).info.run_id


def test_records_a_gone_process_left_in_a_spool_are_reported_then_delivered_with_fix(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    store, run_id = _spooled_run(tmp_path, monkeypatch)
    subprocess.run([sys.executable, "-c", _LEAVE_A_SPOOL, run_id, store], check=True)
    waiting = doctor.check_spools(fix=False)
    assert not waiting.ok and f"{run_id} (2 record(s) for the store {store})" in waiting.detail and "cnn-train sync" in waiting.fix
    assert doctor.check_spools(fix=True).line() == "ok   tracking spool: delivered the waiting records of 1 run(s)"
    run = MlflowClient(store).get_run(run_id)
    assert (run.info.status, run.data.metrics["val_accuracy"]) == ("FINISHED", 0.8)
    assert doctor.check_spools(fix=False).ok


def test_records_of_a_running_run_on_their_way_are_no_fault(tmp_path, monkeypatch):
    """While a sweep trained, doctor said FAIL (records waiting for MLflow) and exited 1 every few seconds,
    MLflow answering all along: a run's records pass through its spool, which its own process delivers."""
    from cnn_train.flows import tracking

    store, run_id = _spooled_run(tmp_path, monkeypatch)
    tracking.Spool(run_id, uri=store).append("batch", {"metrics": [["val_accuracy", 0.8, 1_700_000_000_000, 1]]})
    for fix in (False, True):
        assert doctor.check_spools(fix=fix).line() == (
            "ok   tracking spool: no records left waiting for MLflow (1 running run(s) are delivering theirs)"
        )
    sync = CliRunner().invoke(app, ["sync"])
    assert (sync.exit_code, sync.output) == (
        0, "nothing left waiting: every ended run's records are in MLflow (1 running run(s) are delivering theirs)\n"
    )
    assert tracking.Spool(run_id).count() == 1, "delivered from under the process that writes it"


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


GONE = "the serve process (or worker) that ran it is gone, and no process here runs it"


@pytest.mark.parametrize(
    ("runner", "pid", "pool", "polled", "running_here", "reason"),
    [
        ("serve", "dead", None, False, set(), GONE),
        ("serve", "dead", None, False, {"flow-1"}, None),  # its flow-run process outlived the serve process: still running
        ("serve", "alive", None, False, set(), None),
        ("worker", "dead", "cnn-train", False, set(), GONE),
        # Another machine's worker polls the pool: the run may be there (it was marked Crashed while it trained).
        ("worker", "dead", "cnn-train", True, set(), None),
        # The serve process that took over from the worker does not run the worker's runs.
        ("serve", "alive", "cnn-train", False, set(), GONE),
    ],
    ids=["serve-gone", "serve-gone-flow-run-alive", "serve-alive", "worker-gone", "worker-gone-pool-polled-elsewhere",
         "pool-run-with-only-a-serve-process"],
)
def test_a_flow_run_is_orphaned_only_when_no_process_runs_it(tmp_path, monkeypatch, runner, pid, pool, polled, running_here, reason):
    import os
    from types import SimpleNamespace

    from cnn_train.flows import crashes
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    service = services.serve_process if runner == "serve" else services.worker_process
    service.pid_file.parent.mkdir(parents=True)
    service.pid_file.write_text(str(_exited_pid() if pid == "dead" else os.getpid()))
    flow_run = SimpleNamespace(id="flow-1", deployment_id="deployment-1", infrastructure_pid=None, work_pool_name=pool)
    alive = {r.name for r in crashes.runners() if r.pid() is not None}
    found = crashes._why_orphaned(
        flow_run, runners_alive=alive, polled_pools={pool} if polled else set(), stale_flow_runs=set(), running_here=running_here
    )
    assert found == reason


@pytest.mark.parametrize(
    ("variable", "server", "port"),
    [
        pytest.param(None, "alive", 24555, id="recorded-while-it-runs"),
        pytest.param("5050", "alive", 5050, id="the-variable-wins"),
        pytest.param(None, "dead", 5000, id="a-stopped-servers-record-is-ignored"),
        pytest.param(None, None, 5000, id="nothing-recorded"),
    ],
)
def test_the_mlflow_port_is_the_one_up_started_the_server_on(tmp_path, monkeypatch, variable, server, port):
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CNN_TRAIN_MLFLOW_PORT", raising=False)
    if variable:
        monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", variable)
    if server:
        services.mlflow_server.pid_file.parent.mkdir(parents=True)
        services.mlflow_server.pid_file.write_text(str(os.getpid() if server == "alive" else _exited_pid()))
        services.mlflow_server.port_file.write_text("24555")
    assert services.mlflow_port() == port


def test_a_started_server_records_its_port_and_stopping_it_removes_it(tmp_path, monkeypatch):
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    server = services.Service(name="sleeper", command=lambda: ["sleep", "60"], ready=lambda: server.pid() is not None,
                              port=lambda: 24556)
    server.start(timeout=30)
    try:
        assert server.port_file.read_text() == "24556"
    finally:
        server.stop()
    assert not server.port_file.exists() and not server.pid_file.exists()


def test_a_process_of_the_packages_code_started_before_a_source_changed_says_so(tmp_path, monkeypatch):
    """After a `git pull` with `up` still running, status, doctor and up called the old serve process healthy:
    its deployments kept the old parameters (a new sweep option was refused as unknown)."""
    from cnn_train.flows.ops import detached, services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    source = tmp_path / "flows" / "sweep_flow.py"
    source.parent.mkdir()
    source.write_text("# the code the process imported\n")
    os.utime(source, (time.time() - 60, time.time() - 60))
    # The checkout's files, here one of the test's.
    monkeypatch.setattr(detached, "_package_sources", lambda: [(source, detached._modified(source))])
    server = services.Service(name="served", command=lambda: ["sleep", "60"], ready=lambda: server.pid() is not None, runs_code=True)
    server.start(timeout=30)
    try:
        assert server.code_changed() is None, "nothing changed since it started"
        source.write_text("# pulled\n")
        os.utime(source, (time.time() + 5, time.time() + 5))
        assert server.code_changed() == (
            f"served (pid {server.pid()}) started before flows/sweep_flow.py changed (1 source file(s) since), and serves "
            "the deployments as the code declared them then (parameters, forms): `cnn-train down`, then `cnn-train up`, "
            "to serve this checkout's code"
        )
        plain = services.Service(name="server", command=lambda: ["sleep", "60"], ready=lambda: True)
        plain.pid_file.write_text(str(server.pid()))
        assert plain.code_changed() is None, "a server of a library's code (Prefect's, MLflow's) is not ours to restart"
    finally:
        server.stop()


def test_a_running_server_that_recorded_no_port_gets_it_recorded_by_the_next_up(tmp_path, monkeypatch):
    """Servers an older cnn-train started recorded no port: a shell without the port variables saw them as
    'started, not answering' although they answered, and `up` ("already running") did not add the port."""
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    server = services.Service(name="older", command=lambda: ["sleep", "60"], ready=lambda: server.pid() is not None,
                              port=lambda: 24557)
    server.start(timeout=30)
    try:
        server.port_file.unlink()  # as the older code left it
        assert server.start(timeout=30) is False, "already running: not started again"
        assert server.port_file.read_text() == "24557" and server.running_port() == 24557
    finally:
        server.stop()


@pytest.mark.slow
def test_a_dead_serve_process_is_reported_before_prefect_notices(prefect_api_url, tmp_path, monkeypatch):
    from cnn_train.flows.ops import services
    from cnn_train.flows.train_flow import cnn_train

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    cnn_train.to_deployment(name="doctor-dead-serve").apply()
    services.serve_process.pid_file.parent.mkdir(parents=True)
    services.serve_process.pid_file.write_text(str(_exited_pid()))
    finding = doctor.check_deployment(prefect_api_url, name="cnn-train/doctor-dead-serve")
    assert not finding.ok
    assert "the serve process of cnn-train/doctor-dead-serve" in finding.detail and "is gone" in finding.detail


@pytest.mark.slow
def test_a_pending_flow_run_whose_serve_process_died_is_reported_and_crashed(prefect_api_url, tmp_path, monkeypatch):
    """The serve process claimed the run (Pending) and died, or lost the server, before starting it:
    Prefect's zombie automation never sees it (no heartbeat yet), and it would wait forever."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    from cnn_train.flows.ops import services
    from cnn_train.flows.train_flow import cnn_train
    from tests.stores import new_store

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    store = new_store(tmp_path / "mlflow.db")
    deployment_id = cnn_train.to_deployment(name="doctor-pending").apply()
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(flow_run.id, Pending(), force=True)
    services.serve_process.pid_file.parent.mkdir(parents=True)
    services.serve_process.pid_file.write_text(str(_exited_pid()))

    finding = doctor.check_flow_runs(prefect_api_url, store, fix=False)
    assert not finding.ok
    assert f"({flow_run.id}, Pending): the serve process (or worker) that ran it is gone" in finding.detail
    assert " Pending without a process: " in finding.detail and finding.fix == "run `cnn-train doctor --fix`"

    assert doctor.check_flow_runs(prefect_api_url, store, fix=True).ok
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.type.value == "CRASHED" and "the serve process (or worker) that ran it is gone" in state.message


@pytest.mark.parametrize(
    ("process", "stale", "reason"),
    [
        ("dead", True, "its process {pid} is gone"),  # the surer reason, whatever the heartbeat says
        ("dead", False, "its process {pid} is gone"),  # at once: the heartbeat goes stale only later
        ("alive", True, "its MLflow heartbeat stopped"),  # a process that hangs, or another machine's
        ("alive", False, None),
    ],
    ids=["dead-and-stale", "dead-heartbeat-fresh", "alive-but-stale", "alive-and-beating"],
)
def test_a_command_run_is_judged_by_the_process_it_names_then_by_its_heartbeat(process, stale, reason):
    import os
    from types import SimpleNamespace

    from cnn_train.flows import crashes

    pid = _exited_pid() if process == "dead" else os.getpid()
    flow_run = SimpleNamespace(id="flow-1", deployment_id=None, infrastructure_pid=f"{socket.gethostname()}:{pid}", work_pool_name=None)
    found = crashes._why_orphaned(
        flow_run, runners_alive=set(), polled_pools=set(), stale_flow_runs={"flow-1"} if stale else set(), running_here=set()
    )
    assert found == (reason.format(pid=pid) if reason else None)


def test_runs_without_servers_marks_a_killed_run_crashed(tmp_path, monkeypatch):
    """A `cnn-train run` killed without servers stayed Running in the temporary server's database: nothing
    watched it until the next run started, and `cnn-train runs` listed it Running."""
    import atexit

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from cnn_train.flows.cli import state
    from cnn_train.flows.ops.temporary_server import TemporaryServer
    from tests.stores import new_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(tmp_path / "mlflow.db"))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # a database of its own: the check crashes
    server = TemporaryServer()  # every orphan of the server it reads, and the session's holds other tests' runs
    atexit.register(server.stop)
    with temporary_settings({PREFECT_API_URL: server.ready(timeout=120)}):
        monkeypatch.setattr(state, "_prefect_api", lambda required: None)  # as with no server configured
        with get_client(sync_client=True) as client:  # as a `cnn-train run` leaves it when killed: no deployment
            flow_run = client.create_flow_run(flow=flow(name="cnn-train")(lambda: None), name="killed-duck", state=Running())
            client.update_flow_run(flow_run.id, infrastructure_pid=f"{socket.gethostname()}:{_exited_pid()}")
        first = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "250"})
        again = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "250"})
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0].startswith("flow run killed-duck marked Crashed, its MLflow runs FAILED: its process ")
    assert lines[0].endswith(" is gone") and lines[1].startswith("all 1 cnn-train flow runs on the temporary server's database")
    assert lines[3].split()[3:6] == ["killed-duck", "Crashed", "Marked"]
    assert "marked Crashed" not in again.output and "Crashed" in again.output
