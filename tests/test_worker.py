"""Worker mode: prefect.yaml declares what serve.py serves, on a process work pool; `cnn-train up --worker`
creates the pool and starts a worker through which `prefect deployment run cnn-train/default` completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnn_train.flows.ops import worker
from cnn_train.flows.params import RunParameters
from cnn_train.flows.placement import GpuInfo
from cnn_train.flows.ops.serve import DEPLOYMENTS
from tests.local_stack import BIN, cnn_train_up, prefect_api, run_deployment, training_run
from tests.processes import signal_masks


def test_prefect_yaml_declares_every_served_deployment() -> None:
    assert worker.CHECKOUT_PREFECT_YAML.read_text() == worker.prefect_yaml(), (
        "prefect.yaml differs from flows/ops/serve.py's DEPLOYMENTS; regenerate it: "
        ".venv/bin/python -m cnn_train.flows.ops.worker prefect-yaml"
    )


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.flow_path.rpartition(".")[2])
def test_each_deployment_names_an_importable_flow(deployment) -> None:
    from prefect import Flow

    # A module path without ':' is what a worker imports without any pull step.
    assert ":" not in deployment.flow_path
    assert isinstance(deployment.flow(), Flow)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.flow_path.rpartition(".")[2])
def test_the_readme_names_every_served_deployment(deployment) -> None:
    """README's "The two commands" lists what `cnn-train up` serves (it once left out cnn-train-tune)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    serve_item = readme[readme.index("3. a serve process for the deployments") :].split("\n\n", 1)[0]
    assert f"`{deployment.flow().name}/{deployment.name}`" in " ".join(serve_item.split())


def test_served_deployments_import_their_flow_by_module_path_as_workers_do() -> None:
    """Loaded from its file, a flow's module is named "sweep_flow", which a Ray worker cannot import to
    unpickle a trial's task: a served sweep on Ray failed with "No module named 'sweep_flow'"."""
    from cnn_train.flows.ops.serve import served_deployments

    assert [d.entrypoint for d in served_deployments()] == [d.flow_path for d in DEPLOYMENTS]


@pytest.mark.parametrize(
    ("deployment", "served"),
    [
        pytest.param({"created": "2026-12-05T11:39:54Z", "updated": "2026-12-05T12:06:02Z"}, False, id="an-earlier-serves"),
        pytest.param({"created": "2026-12-05T11:39:54Z", "updated": "2026-12-05T12:32:14Z"}, True, id="registered-since"),
        pytest.param({"created": "2026-12-05T12:32:14Z", "updated": None}, True, id="created-since"),
    ],
)
def test_up_waits_for_the_new_serve_process_to_register_the_deployment(deployment, served) -> None:
    """Seen by hand: `up` said served while the deployment still had the previous serve's parameters,
    so a trigger with a new parameter was refused for a few seconds."""
    from datetime import datetime

    from cnn_train.flows.ops.services import registered_since

    serve_started = datetime.fromisoformat("2026-12-05T12:32:10Z").timestamp()
    assert registered_since(deployment, serve_started) is served


def _as_a_background_job(code: str, **options: object) -> subprocess.Popen:
    """``python -c code`` started as a shell starts a command it runs in the background: SIGINT ignored."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), **options)


@pytest.mark.parametrize("fixed", [True, False], ids=["interruptible", "as-the-shell-left-it"])
def test_serve_stops_on_sigint_even_when_started_with_it_ignored(fixed: bool) -> None:
    code = ("import time; from cnn_train.flows.ops import serve; " + ("serve.interruptible(); " if fixed else "")
            + "print('ready', flush=True); time.sleep(30)")
    process = _as_a_background_job(code, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        stopped = process.poll() is not None
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert stopped == fixed
    assert ("KeyboardInterrupt" in stderr) == fixed


def _sigint_ignored(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGINT (signal 2's bit in its SigIgn mask)."""
    return bool(signal_masks(pid)["SigIgn"] & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("through_cli", [True, False], ids=["after-a-cnn-train-command", "as-the-shell-left-it"])
def test_a_command_started_with_sigint_ignored_takes_it_back(through_cli: bool, tmp_path: Path) -> None:
    # A cnn-train command a shell ran in the background, and a program it starts that sets no handler.
    command = "from cnn_train.flows.cli import app; app(['backends'], standalone_mode=False); " if through_cli else ""
    code = ("import subprocess, sys; " + command
            + "child = subprocess.Popen(['sleep', '30']); print('child', child.pid, flush=True); child.wait()")
    env = os.environ | {"CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}
    process = _as_a_background_job(code, env=env)
    try:
        child = int(next(line for line in process.stdout if line.startswith("child ")).split()[1])
        ignored = _sigint_ignored(child)
        os.kill(child, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert ignored != through_cli


def _gpus(count: int) -> list[GpuInfo]:
    return [GpuInfo(index, "Test GPU", 16_000, 16_000) for index in range(count)]


@pytest.mark.parametrize(("gpus", "limit"), [(0, None), (1, 1), (4, 4)], ids=["cpu-only", "one-gpu", "four-gpus"])
def test_a_worker_takes_one_flow_run_per_gpu(gpus: int, limit: int | None) -> None:
    assert worker.concurrency_limit(lambda: _gpus(gpus)) == limit
    command = worker.worker_command(limit)
    # A background worker ignores SIGTERM unless INT has its default action back (PLATFORM-NOTES).
    assert command[:2] == ["env", "--default-signal=INT"]
    assert command[command.index("--pool") + 1] == worker.pool_name()
    assert (command[command.index("--limit") + 1] if "--limit" in command else None) == (str(limit) if limit else None)


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory, real_fashion_mnist_dir):
    """`cnn-train up --no-trigger --worker` in a private project root, home and pair of ports; `down` after."""
    with cnn_train_up(tmp_path_factory.mktemp("worker-project"), real_fashion_mnist_dir, "--worker", timeout=600) as started:
        yield started


@pytest.mark.slow
def test_up_worker_creates_the_pool_and_deploys_every_field(worker_stack):
    env, output = worker_stack
    assert "worker: starting" in output and "deployment-server" not in output
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as client:
        assert client.read_work_pool(worker.WORK_POOL).type == "process"
        for deployment in DEPLOYMENTS:
            deployed = client.read_deployment_by_name(f"{deployment.flow().name}/{deployment.name}")
            assert deployed.work_pool_name == worker.WORK_POOL
            # `prefect deploy` imported the flow, so the generated signature is in the form.
            assert set(deployed.parameter_openapi_schema["properties"]) == set(deployment.flow().parameters.properties)
        default = client.read_deployment_by_name("cnn-train/default")
    assert set(RunParameters.model_fields) <= set(default.parameter_openapi_schema["properties"])
    doctor = subprocess.run([BIN / "cnn-train", "doctor"], env=env, capture_output=True, text=True, timeout=180)
    line = next(line for line in doctor.stdout.splitlines() if "deployment:" in line)
    assert line.startswith(
        f"ok   deployment: cnn-train/default runs on work pool 'cnn-train' (1 worker(s) online: {worker.worker_name()})"
    )


@pytest.mark.slow
def test_prefect_deployment_run_completes_through_the_worker(worker_stack):
    env, _ = worker_stack
    flow_run_id = run_deployment(env, "cnn-train/default", "epochs=1", "sample_limit=2000", watch_timeout=500)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.work_pool_name == worker.WORK_POOL
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}")
    runs = client.search_runs(
        [client.get_experiment_by_name("cnn-train").experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    main = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(main) == 1 and main[0].info.status == "FINISHED"
    assert main[0].data.params["sample_limit"] == "2000"


@pytest.mark.slow
def test_serving_again_takes_the_deployments_back_from_the_pool(worker_stack):
    """Also: the worker's run in flight ends as an interrupted run does. Stopping the worker killed its
    flow-run process on the spot, its runs left Running and RUNNING until a heartbeat ran out."""
    from mlflow import MlflowClient

    env, _ = worker_stack
    flow_run_id, mlflow_run_id = training_run(env)
    up = subprocess.run([BIN / "cnn-train", "up", "--no-trigger"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "worker: stopped (the serve process takes over the deployments)" in up.stdout
    assert MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}").get_run(mlflow_run_id).info.status == "KILLED"
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as client:
        stopped = client.read_flow_run(flow_run_id).state
        assert (stopped.name, stopped.message) == ("Crashed", "Execution was aborted by an interrupt signal.")
        assert client.read_deployment_by_name("cnn-train/default").work_pool_name is None
        deadline = time.monotonic() + 120  # READY once the serve process has polled
        while client.read_deployment_by_name("cnn-train/default").status.value != "READY":
            assert time.monotonic() < deadline, "the serve process never polled for cnn-train/default"
            time.sleep(1)
    doctor = subprocess.run([BIN / "cnn-train", "doctor"], env=env, capture_output=True, text=True, timeout=180)
    assert "ok   deployment: cnn-train/default is served (status READY)" in doctor.stdout
