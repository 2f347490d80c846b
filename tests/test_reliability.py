"""Faults against real processes: SIGTERM, SIGKILL then reaping, a transient failure retried with
resume, four concurrent runs on one tracking store; and bad input that must fail cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("cnn-train")
QUICK = ["--epochs", "1", "--sample-limit", "300", "--test-limit", "100"]


def _env(prefect_api_url: str, tracking_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = os.environ | {
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
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


def _wait_for_epoch(uri: str, process: subprocess.Popen, timeout: float = 240) -> str:
    """The run id once its first epoch is in MLflow (so the process is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "process ended early"
        for run in _runs(uri):
            if _client(uri).get_metric_history(run.info.run_id, "val_accuracy"):
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError("no epoch was logged in time")


def _register(tmp_path: Path, name: str, target: str) -> str:
    """A real distribution (dist-info on the path) registering ``target`` under ``name``."""
    site = tmp_path / "site"
    dist_info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[cnn_train.backends]\n{name} = {target}\n")
    return str(site)


@pytest.fixture
def store(tmp_path, real_fashion_mnist_dir, monkeypatch) -> str:
    monkeypatch.setenv("CNN_TRAIN_DATA_DIR", str(real_fashion_mnist_dir))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Create the schema once before several processes touch it (concurrent creation races).
    subprocess.run([Path(sys.executable).with_name("mlflow"), "db", "upgrade", uri], check=True, capture_output=True)
    return uri


def _flow_run_state(prefect_api_url: str, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_sigterm_during_training_ends_the_run_killed(prefect_api_url, store, tmp_path):
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "6", "--sample-limit", "4000", "--test-limit", "100"],
        env=_env(prefect_api_url, store, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    run_id = _wait_for_epoch(store, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    run = _client(store).get_run(run_id)
    assert run.info.status == "KILLED", output[-2000:]
    # The partial model is not logged as if it were final.
    assert not _client(store).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert _flow_run_state(prefect_api_url, run.data.tags["prefect.flow_run_id"]) in ("CRASHED", "CANCELLED", "FAILED")
    # Nothing already recorded is lost: the epochs before the signal are still there.
    assert [m.step for m in _client(store).get_metric_history(run_id, "val_accuracy")][:1] == [1]


def test_sigkill_then_reaped_by_doctor_and_by_the_next_start(prefect_api_url, store, tmp_path):
    env = _env(prefect_api_url, store, tmp_path, CNN_TRAIN_HEARTBEAT_SECONDS="1")
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "6", "--sample-limit", "4000", "--test-limit", "100"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    run_id = _wait_for_epoch(store, process)
    process.kill()
    process.wait(timeout=30)
    assert _client(store).get_run(run_id).info.status == "RUNNING"  # it could not mark itself
    time.sleep(7)  # heartbeat 1 s: stale after 6 s
    report = subprocess.run([CLI, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert f"FAIL stale runs: 1 run(s) RUNNING without a heartbeat: {run_id}" in report.stdout
    fixed = subprocess.run([CLI, "doctor", "--fix"], env=env, capture_output=True, text=True, timeout=120)
    assert f"marked 1 abandoned run(s) FAILED: {run_id}" in fixed.stdout
    run = _client(store).get_run(run_id)
    assert run.info.status == "FAILED"
    assert "no heartbeat" in run.data.tags["cnn_train.reaped"]


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
        PLUGIN_PATH=_register(tmp_path, "flaky-torch", "tests.plugin_fixtures:FlakyBackend"),
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_four_concurrent_runs_all_land(prefect_api_url, store, tmp_path):
    """Four flow runs at once through the MLflow server, as the deployment logs: all complete."""
    port = _free_port()
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
        from cnn_train.flows.services import http_ok

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


def test_unreachable_tracking_server_fails_before_training(prefect_api_url, tmp_path):
    env = _env(prefect_api_url, f"http://127.0.0.1:{_free_port()}", tmp_path)
    result = subprocess.run([CLI, "run", *QUICK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "is not reachable" in result.stdout + result.stderr
    assert "epoch 1/" not in result.stdout + result.stderr


def test_corrupt_dataset_fails_the_run_cleanly(prefect_api_url, store, tmp_path):
    bad = tmp_path / "bad-data"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        source = Path("/usr/share/datasets/fashion-mnist") / name
        data = source.read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2] if name.startswith("train-images") else data)
    result = subprocess.run([CLI, "run", *QUICK, "--data-dir", str(bad)], env=_env(prefect_api_url, store, tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "train-images-idx3-ubyte.gz" in result.stdout + result.stderr
    (run,) = _runs(store)
    assert run.info.status == "FAILED"


def test_backend_returning_wrong_shapes_is_refused(prefect_api_url, store, tmp_path):
    env = _env(prefect_api_url, store, tmp_path, PLUGIN_PATH=_register(tmp_path, "wrong-shape", "tests.plugin_fixtures:WrongShapeBackend"))
    result = subprocess.run([CLI, "run", "--backend", "wrong-shape", *QUICK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "backend 'wrong-shape' broke the contract: predict_proba returned shape (100, 9), expected (100, 10)" in result.stdout + result.stderr
    (run,) = _runs(store)
    assert run.info.status == "FAILED"
