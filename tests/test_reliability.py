"""Faults against real processes: SIGTERM, SIGKILL then reaping, a transient failure retried with
resume, four concurrent runs on one tracking store; and bad input that must fail cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.local_stack import free_port
from tests.plugin_fixtures import backend_plugin_site
from tests.stores import new_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("cnn-train")
QUICK = ["--epochs", "1", "--sample-limit", "300", "--test-limit", "100"]


def _env(prefect_api_url: str, tracking_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)  # the project root each process is given: one that exists
    env = os.environ | {
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
        # A run through a server on this machine files its artifacts under the project root (where
        # `cnn-train up`'s server keeps them): here, not in the checkout.
        "CNN_TRAIN_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [extra.pop("PLUGIN_PATH", ""), str(ROOT)])),
    }
    return env | extra


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str) -> list:
    client = _client(uri)
    experiment = client.get_experiment_by_name("cnn-train")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _wait_for_epoch(uri: str, process: subprocess.Popen, timeout: float = 900) -> str:
    """The run id once its first epoch is in MLflow (so the process is mid-training)."""
    return _wait_for_epochs(uri, process, 1, timeout)[0]


def _wait_for_epochs(uri: str, process: subprocess.Popen, count: int, timeout: float = 900) -> list[str]:
    """The ids of ``count`` runs once each has its first epoch in MLflow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "process ended early"
        training = [run.info.run_id for run in _runs(uri) if _client(uri).get_metric_history(run.info.run_id, "val_accuracy")]
        if len(training) >= count:
            return training
        time.sleep(0.5)
    raise AssertionError("no epoch was logged in time")


@pytest.fixture
def store(tmp_path, real_fashion_mnist_dir, monkeypatch) -> str:
    monkeypatch.setenv("CNN_TRAIN_DATA_DIR", str(real_fashion_mnist_dir))
    # The schema exists before several processes touch it (concurrent creation races).
    return new_store(tmp_path / "mlflow.db")


def _flow_run_state(prefect_api_url: str, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def _task_run_states(prefect_api_url: str, flow_run_id: str) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(run.name, run.state.type.value) for run in task_runs]


def test_sigterm_during_training_ends_the_run_killed(prefect_api_url, store, tmp_path):
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "6", "--sample-limit", "1500", "--test-limit", "100"],
        env=_env(prefect_api_url, store, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    run_id = _wait_for_epoch(store, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    run = _client(store).get_run(run_id)
    assert run.info.status == "KILLED", output[-2000:]
    # Its page said nothing of why it stopped.
    assert run.data.tags["mlflow.note.content"].startswith("**Stopped before it finished**: interrupted, or its flow run cancelled.")
    # The partial model is not logged as if it were final.
    assert not _client(store).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert _flow_run_state(prefect_api_url, run.data.tags["prefect.flow_run_id"]) in ("CRASHED", "CANCELLED", "FAILED")
    # Nothing already recorded is lost: the epochs before the signal are still there.
    assert [m.step for m in _client(store).get_metric_history(run_id, "val_accuracy")][:1] == [1]


@pytest.mark.parametrize(
    "search",
    [
        pytest.param(["sweep", "--grid", "learning_rate=0.001,0.002"], id="sweep"),
        # Ray's handler made SIGTERM a SystemExit (the sweep's run FAILED), and its shutdown killed the trials
        # under their runs (FAILED by the crash hook) and task runs (Running for good).
        pytest.param(["sweep", "--grid", "learning_rate=0.001,0.002", "--task-runner", "ray"], id="sweep-on-ray"),
        pytest.param(
            ["tune", "--study-name", "stopped", "--space", "learning_rate=log:1e-4:1e-2", "--trials", "2", "--no-prune"],
            id="tune",
        ),
    ],
)
def test_sigterm_during_a_search_ends_its_trials_in_threads_killed(search, prefect_api_url, store, tmp_path):
    """Prefect's thread-pool runner waits for tasks already running: the trials went on to their last
    epoch after the signal, and the command with them."""
    epochs = 500
    process = subprocess.Popen(
        [CLI, *search, "--architecture", "dense", "--epochs", str(epochs), "--sample-limit", "1500", "--test-limit", "100"],
        env=_env(prefect_api_url, store, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        trials = _wait_for_epochs(store, process, 2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    client = _client(store)
    runs = {run.info.run_id: run for run in _runs(store)}
    assert {runs[trial].info.status for trial in trials} == {"KILLED"}, output[-3000:]
    assert {runs[runs[trial].data.tags["mlflow.parentRunId"]].info.status for trial in trials} == {"KILLED"}
    assert all(0 < len(client.get_metric_history(trial, "val_accuracy")) < epochs for trial in trials)
    flow_run_id = runs[trials[0]].data.tags["prefect.flow_run_id"]
    assert {state for name, state in _task_run_states(prefect_api_url, flow_run_id) if "trial" in name} == {"CRASHED"}, output[-3000:]
    if search[0] == "tune":  # the study holds them failed and queued again, not RUNNING until its next invocation
        import optuna

        # The command ends on the signal: its log says how to go on (it said nothing).
        assert re.search(r"study stopped stopped: trial\(s\) [01], [01] queued again; run the same command", output), output[-3000:]

        study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{tmp_path / 'state' / 'optuna.db'}")
        states = {state: sorted(t.params["learning_rate"] for t in study.trials if t.state == state) for state in TrialState}
        assert len(states[TrialState.FAIL]) == 2 and states[TrialState.WAITING] == states[TrialState.FAIL], states
        assert not states[TrialState.RUNNING]


def test_sigkill_then_reaped_by_doctor_and_by_the_next_start(prefect_api_url, store, tmp_path):
    env = _env(prefect_api_url, store, tmp_path, CNN_TRAIN_HEARTBEAT_SECONDS="1")
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "6", "--sample-limit", "1500", "--test-limit", "100"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    run_id = _wait_for_epoch(store, process)
    process.kill()
    process.wait(timeout=30)
    assert _client(store).get_run(run_id).info.status == "RUNNING"  # it could not mark itself
    flow_run_id = _client(store).get_run(run_id).data.tags["prefect.flow_run_id"]
    # At once, by its process (the flow run names it): before, nothing until the heartbeat was stale.
    at_once = subprocess.run([CLI, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert f"({flow_run_id}, Running): its process {process.pid} is gone" in at_once.stdout, at_once.stdout
    time.sleep(7)  # heartbeat 1 s: stale after 6 s
    report = subprocess.run([CLI, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert f"FAIL stale runs: 1 run(s) RUNNING without a heartbeat: {run_id}" in report.stdout
    assert "FAIL flow runs: 1 flow run(s) Running without a process: " in report.stdout
    assert f"({flow_run_id}, Running): its process {process.pid} is gone" in report.stdout  # the surer reason first
    fixed = subprocess.run([CLI, "doctor", "--fix"], env=env, capture_output=True, text=True, timeout=120)
    assert "ok   flow runs: marked 1 orphaned flow run(s) Crashed, their MLflow runs FAILED" in fixed.stdout
    run = _client(store).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["cnn_train.reaped"] == f"flow run its process {process.pid} is gone"
    assert run.data.tags["mlflow.note.content"] == f"**Failed**: its flow run was marked Crashed: its process {process.pid} is gone"
    assert _flow_run_state(prefect_api_url, flow_run_id) == "CRASHED"


def test_next_start_reaps_an_abandoned_run(prefect_api_url, store, tmp_path, monkeypatch):
    from cnn_train.flows import tracking

    # An abandoned run as a SIGKILLed process leaves it: RUNNING, heartbeat long stopped.
    abandoned = tracking.RunTracker.start("cnn-train", uri=store)
    abandoned.set_tags({tracking.HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"})
    result = subprocess.run([CLI, "run", *QUICK], env=_env(prefect_api_url, store, tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert _client(store).get_run(abandoned.run_id).info.status == "FAILED"


def test_transient_failure_is_retried_and_resumes_from_the_last_epoch(prefect_api_url, store, tmp_path):
    marker = tmp_path / "failed-once"
    env = _env(
        prefect_api_url, store, tmp_path,
        PLUGIN_PATH=str(backend_plugin_site(tmp_path / "site", "flaky-torch", "tests.plugin_fixtures:FlakyBackend")),
        FLAKY_MARKER=str(marker),
    )
    result = subprocess.run(
        [CLI, "run", "--backend", "flaky-torch", "--epochs", "3", "--sample-limit", "600", "--test-limit", "100"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert marker.exists(), "the fault was never injected"
    assert "injected transient fault after epoch 1" in output
    assert "resumed after epoch 1" in output
    (run,) = _runs(store)  # one MLflow run, not one per attempt
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy", "epoch_seconds"):
        assert [m.step for m in _client(store).get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert _client(store).search_logged_models(experiment_ids=[run.info.experiment_id])


def test_a_full_disk_is_one_line_not_retried_and_ends_the_run_failed_saying_so(prefect_api_url, store, tmp_path):
    """A full disk used to fail a run in thousands of lines, the checkpoint write retried as if transient."""
    env = _env(
        prefect_api_url, store, tmp_path,
        PLUGIN_PATH=str(backend_plugin_site(tmp_path / "site", "full-disk", "tests.plugin_fixtures:DiskFullBackend")),
    )
    result = subprocess.run(
        [CLI, "run", "--backend", "full-disk", "--epochs", "2", "--sample-limit", "300", "--test-limit", "100"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "Retry" not in output, output[-3000:]
    line = (
        f"a disk this run writes to is full (writing {tmp_path}/state/checkpoints/"
    )
    assert result.stderr.splitlines()[-1].startswith(f"cnn-train: {line}"), result.stderr[-2000:]
    assert "free some space, then run again; `cnn-train doctor --fix` ends what" in result.stderr.splitlines()[-1]
    (run,) = _runs(store)
    assert run.info.status == "FAILED"
    assert line in run.data.tags["mlflow.note.content"]


def test_four_concurrent_runs_all_land(prefect_api_url, store, tmp_path):
    """Four flow runs at once through the MLflow server, as the deployment logs: all complete."""
    port = free_port()
    db = store.removeprefix("sqlite:///")
    server = subprocess.Popen(
        [Path(sys.executable).with_name("mlflow"), "server", "--backend-store-uri", store,
         "--artifacts-destination", str(Path(db).parent / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        from cnn_train.flows.ops.services import http_ok

        deadline = time.monotonic() + 90
        while not http_ok(f"{uri}/health"):
            assert time.monotonic() < deadline and server.poll() is None, "MLflow server did not start"
            time.sleep(0.5)
        runs = [
            subprocess.Popen(
                [CLI, "run", *QUICK, "--seed", str(seed)],
                env=_env(prefect_api_url, uri, tmp_path / f"run{seed}"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for seed in range(4)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in runs]
        for process, output in zip(runs, outputs):
            assert process.returncode == 0, output[-3000:]
            assert "database is locked" not in output
        finished = [r for r in _runs(uri) if r.info.status == "FINISHED"]
        assert sorted(r.data.params["seed"] for r in finished) == ["0", "1", "2", "3"]
        client = _client(uri)
        for run in finished:
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
            assert "test_accuracy" in run.data.metrics
        models = client.search_logged_models(experiment_ids=[finished[0].info.experiment_id])
        assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in finished)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _truncated_dataset(folder: Path) -> Path:
    """The official files with the training images cut in half, as an interrupted copy leaves them."""
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        data = (Path("/usr/share/datasets/fashion-mnist") / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2] if name.startswith("train-images") else data)
    return folder


# (case, extra CLI arguments, env override, the line's start, whether a run was created: only when the
# problem shows while the data is read; everything else is checked before any MLflow run exists)
EXPECTED_FAILURES = [
    ("truncated-dataset", lambda tmp: ["--data-dir", str(_truncated_dataset(tmp / "bad"))], {},
     "cnn-train: {tmp}/bad/train-images-idx3-ubyte.gz: not a complete gzip file", True),
    ("missing-data-dir", lambda tmp: ["--data-dir", str(tmp / "nope")], {},
     "cnn-train: data_dir: {tmp}/nope does not exist", False),
    ("unreachable-mlflow", lambda tmp: [], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
     "cnn-train: MLflow tracking server http://127.0.0.1:9 is not reachable", False),
    ("unknown-tracking-scheme", lambda tmp: [], {"MLFLOW_TRACKING_URI": "htp://127.0.0.1:5000"},
     "cnn-train: MLFLOW_TRACKING_URI htp://127.0.0.1:5000 has a scheme MLflow has no tracking store for", False),
    ("absent-gpu", lambda tmp: ["--train-device", "gpu-required"], {},
     "cnn-train: train requires a GPU (gpu-required), but no GPU is visible", False),
    ("state-dir-not-a-folder", lambda tmp: [], {"CNN_TRAIN_STATE_DIR": "/dev/null/state"},
     "cnn-train: CNN_TRAIN_STATE_DIR=/dev/null/state cannot be created (Not a directory); point it at a folder", False),
    # A typo made a new, empty project there, the runs made so far out of view.
    ("project-root-not-a-folder", lambda tmp: [], {"CNN_TRAIN_ROOT": "/nonexistent-cnn-train-root"},
     "cnn-train: CNN_TRAIN_ROOT='/nonexistent-cnn-train-root' is no folder: point it at the project's folder, or unset it", False),
]


@pytest.mark.parametrize(("case", "arguments", "env", "line_start", "creates_run"), EXPECTED_FAILURES,
                         ids=[case[0] for case in EXPECTED_FAILURES])
def test_an_expected_failure_is_one_line_on_stderr(prefect_api_url, store, tmp_path, case, arguments, env, line_start,
                                                   creates_run):
    result = subprocess.run([CLI, "run", *QUICK, *arguments(tmp_path)], env=_env(prefect_api_url, store, tmp_path) | env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    lines = result.stderr.splitlines() or [""]
    assert len(lines) == 1, result.stderr[-3000:]
    (line,) = lines
    assert line.startswith(line_start.format(tmp=tmp_path)), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    runs = _runs(store)
    assert [run.info.status for run in runs] == (["FAILED"] if creates_run else [])
    if creates_run:  # the Prefect flow run and the MLflow run's description say the same line
        state = _flow_run_state_message(prefect_api_url, runs[0].data.tags["prefect.flow_run_id"])
        assert f"cnn-train: {state}" == line
        assert runs[0].data.tags["mlflow.note.content"] == f"**Failed**: {state}"


@pytest.mark.parametrize(
    ("error", "debug", "traceback_kept"),
    [
        pytest.param("expected", False, None, id="expected-failure"),
        pytest.param("failed-run", False, None, id="prefects-failed-run-restating-the-state"),
        pytest.param("bug", False, True, id="a-bug"),
        pytest.param("expected", True, True, id="expected-failure-with-debug"),
    ],
)
@pytest.mark.parametrize("message", ["Engine execution exited with unexpected exception", "Task run failed"],
                         ids=["engine-restatement", "other-record"])
def test_run_loggers_keep_tracebacks_for_bugs_only(monkeypatch, error, debug, traceback_kept, message):
    """The served flow run's log ended on an ERROR "Engine execution exited with unexpected exception" after
    the one line of a failure the user can fix: that restatement goes; other records lose the traceback."""
    import logging

    from prefect.exceptions import FailedRun

    from cnn_train.flows.errors import DEBUG_ENV, ExpectedFailure, hide_expected_tracebacks

    monkeypatch.setenv(DEBUG_ENV, "1" if debug else "0")
    hide_expected_tracebacks()
    raised = {"expected": ExpectedFailure("bad input"), "failed-run": FailedRun("bad input"), "bug": KeyError("x")}[error]
    try:
        raise raised
    except Exception:
        record = logging.getLogger("prefect.flow_runs").makeRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, message, (), sys.exc_info(),
        )
    kept = logging.getLogger("prefect.flow_runs").filter(record)
    if traceback_kept is None:  # an expected failure
        assert kept == (message != "Engine execution exited with unexpected exception")
        assert not kept or record.exc_info is None
    else:
        assert kept and (record.exc_info is not None) == traceback_kept


def _flow_run_state_message(prefect_api_url: str, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.message


def test_backend_returning_wrong_shapes_is_refused(prefect_api_url, store, tmp_path):
    env = _env(prefect_api_url, store, tmp_path, PLUGIN_PATH=str(backend_plugin_site(tmp_path / "site", "wrong-shape", "tests.plugin_fixtures:WrongShapeBackend")))
    result = subprocess.run([CLI, "run", "--backend", "wrong-shape", *QUICK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    # Found as the training ends, on the model's input example, before the model is logged; one line,
    # not retried: a retry would resume from the last epoch and return the same shape.
    assert result.stderr.strip().splitlines() == [
        "cnn-train: backend 'wrong-shape' broke the contract: predict_proba returned shape (2, 9) for 2 images, "
        "expected (2, 10). Check it with `cnn-train check-backend wrong-shape`"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stdout and "Retry" not in result.stdout, result.stdout[-3000:]
    (run,) = _runs(store)
    assert run.info.status == "FAILED"
    assert not _client(store).search_logged_models(experiment_ids=[run.info.experiment_id])
