"""Tracking never blocks training and loses nothing: records wait on disk while MLflow is away and
land exactly once when it is back, during the run or later through `cnn-train sync` / `doctor --fix`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cnn_train.flows import tracking
from cnn_train.flows.tracking.spool import Spool
from tests.local_stack import free_port
from tests.stores import new_store, uniform_model

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("cnn-train")
#: How long the MLflow server stays dead in the outage test.
OUTAGE_SECONDS = 180.0
EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds", "images_per_second")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    return new_store(tmp_path / "mlflow.db")


def test_a_record_delivered_twice_lands_once_and_the_end_comes_last(store):
    tracker = tracking.RunTracker.start("spool", uri=store)
    tracker.log_metrics({"val_accuracy": 0.5}, step=1)
    spool = Spool(tracker.run_id)
    # A process that died after MLflow took a record but before the spool dropped it sends it again.
    (_, kind, payload), *_ = spool.pending() or [(0, "", {})]
    assert tracker.flush(10) == 0
    spool.append(kind, payload)
    tracker.log_metrics({"val_accuracy": 0.6}, step=2)
    assert tracker.finish("FINISHED") == 0
    client = MlflowClient(store)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val_accuracy")] == [(1, 0.5), (2, 0.6)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not spool.folder.exists(), "a delivered spool is removed"


def test_metrics_linked_to_a_logged_model_land_on_it_and_an_older_record_still_delivers(store):
    """A spool written before metrics carried a model link (four fields each) is still delivered after an upgrade."""
    tracker = tracking.RunTracker.start("spool", uri=store)
    model_uri = tracker.log_model(uniform_model(), tracking.ModelRecord((28, 28, 1), 10))
    tracker.log_metrics({"test_accuracy": 0.7}, step=2, model_uri=model_uri, dataset=("fashion-mnist-test", "d1"))
    Spool(tracker.run_id).append("batch", {"metrics": [["older", 0.5, 1_700_000_000_000, 1]]})
    assert tracker.finish("FINISHED") == 0
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert (run.data.metrics["test_accuracy"], run.data.metrics["older"]) == (0.7, 0.5)
    (linked,) = client.get_logged_model(model_uri.removeprefix("models:/")).metrics
    assert (linked.key, linked.value, linked.step, linked.dataset_name, linked.dataset_digest) == (
        "test_accuracy", 0.7, 2, "fashion-mnist-test", "d1"
    )


def test_a_registration_kept_with_a_spooled_model_is_made_once_the_model_is_delivered(store, tmp_path):
    """--register while MLflow was away retried for minutes, then failed the run: the version never existed."""
    from dataclasses import asdict

    tracker = tracking.RunTracker.start("spool", uri=store)
    record = tracking.ModelRecord((28, 28, 1), 10)
    tracking.models.save_model(tmp_path / "model", uniform_model(), record)  # as log_model keeps it while MLflow is away
    Spool(tracker.run_id).append("model", {"experiment_id": tracker.experiment_id, "name": "model", "tags": {"flavor": "pyfunc"}},
                                 files=tmp_path / "model")
    facts = tracking.VersionFacts(test_accuracy=0.8, backend="torch", architecture="cnn", dataset_digest="split",
                                  test_set_digest="tests", mlflow_run_id=tracker.run_id)
    tracker.register_later("waited-line", asdict(facts), "kept while MLflow was away", model_uri=None, record_on=tracker.run_id)
    assert tracker.finish("FINISHED") == 0
    client = MlflowClient(store)
    version = client.get_model_version_by_alias("waited-line", "champion")
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs
    assert (str(version.version), version.source, version.tags["test_accuracy"]) == ("1", f"models:/{output.model_id}", "0.8")
    assert client.get_run(tracker.run_id).data.tags["cnn_train.registered_model"] == "waited-line/1"


@pytest.mark.parametrize("delivered_first", [False, True], ids=["model-still-waiting", "model-delivered-meanwhile"])
def test_test_metrics_of_a_model_kept_in_the_spool_link_to_it_once_it_is_logged(store, monkeypatch, delivered_first):
    """A model saved into the spool has no URI when its test metrics are logged; they were left unlinked."""
    from cnn_train.flows.tracking import runs

    tracker = tracking.RunTracker.start("spool", uri=store)

    def away(uri, **_):
        raise tracking.TrackingUnavailableError(f"{uri} does not answer")

    with monkeypatch.context() as outage:  # only log_model sees the outage; the courier may deliver meanwhile
        outage.setattr(runs, "check_reachable", away)
        example = np.zeros((2, 28, 28, 1), dtype=np.float32)  # as the flow logs it (and MLflow wants one)
        assert tracker.log_model(uniform_model(), tracking.ModelRecord((28, 28, 1), 10, input_example=example)) is None
    if delivered_first:
        assert tracker.flush(10) == 0
    tracker.log_metrics({"test_accuracy": 0.7}, step=2, model_uri=None, dataset=("fashion-mnist-test", "d1"))
    tracker.log_metrics({"unlinked": 1.0}, step=2)
    assert tracker.finish("FINISHED") == 0
    client = MlflowClient(store)
    (output,) = client.get_run(tracker.run_id).outputs.model_outputs
    (linked,) = client.get_logged_model(output.model_id).metrics
    assert (linked.key, linked.value, linked.dataset_name, linked.dataset_digest) == ("test_accuracy", 0.7, "fashion-mnist-test", "d1")
    assert client.get_run(tracker.run_id).data.metrics["unlinked"] == 1.0


def test_a_record_mlflow_refuses_is_dropped_and_the_rest_go_on(store, caplog):
    tracker = tracking.RunTracker.start("spool", uri=store)
    tracker.log_params({"seed": 1})
    tracker.log_params({"seed": 2})  # MLflow refuses to change a logged param
    tracker.set_tags({"after": "yes"})
    assert tracker.finish("FINISHED") == 0
    run = MlflowClient(store).get_run(tracker.run_id)
    assert (run.data.params["seed"], run.data.tags["after"], run.info.status) == ("1", "yes", "FINISHED")
    assert "MLflow refused a batch record" in caplog.text


def _couriers_of(run_id: str, deadline: float = 10.0) -> list[str]:
    """Names of this process's live courier threads for ``run_id`` once none is left, or after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        names = [thread.name for thread in threading.enumerate() if thread.name == f"mlflow-spool-{run_id[:8]}"]
        if not names or time.monotonic() > end:
            return names
        time.sleep(0.1)


@pytest.mark.parametrize("runs", [1, 3], ids=["one-run", "three-runs-in-one-process"])
def test_a_finished_runs_courier_ends_and_reading_it_makes_no_spool_again(store, runs):
    trackers = []
    for index in range(runs):  # as a sweep's trials or a study's do, one after another in one process
        tracker = tracking.RunTracker.start("spool", uri=store)
        tracker.log_metrics({"val_accuracy": 0.5 + index / 10}, step=1)
        assert tracker.finish("FINISHED") == 0
        trackers.append(tracker)
    for tracker in trackers:
        assert _couriers_of(tracker.run_id) == [], "a finished run's courier thread is still running"
        # Reading the finished run (its status, its steps, a client) neither re-creates its spool nor
        # starts another courier.
        assert tracker.status() == "FINISHED"
        assert tracker.logged_steps("val_accuracy") == [1]
        assert tracker.flush(1) == 0
        assert not Spool(tracker.run_id).folder.exists(), "reading a finished run made its spool again"
        assert _couriers_of(tracker.run_id, deadline=0) == []


def test_a_run_logging_again_after_its_spool_was_removed_gets_a_courier_that_delivers(store):
    tracker = tracking.RunTracker.start("spool", uri=store)
    tracker.log_metrics({"val_accuracy": 0.5}, step=1)
    assert tracker.flush(10) == 0
    Spool(tracker.run_id).discard_if_empty()  # as `cnn-train sync` from another process may do mid-run
    assert _couriers_of(tracker.run_id) == []
    tracker.log_metrics({"val_accuracy": 0.6}, step=2)
    assert tracker.finish("FINISHED", flush_timeout=10) == 0
    history = MlflowClient(store).get_metric_history(tracker.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]


def test_logged_steps_include_what_still_waits(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = tracking.RunTracker(dead, "0123456789abcdef", "1")
    started = time.monotonic()
    tracker.log_metrics({"val_accuracy": 0.5}, step=1)
    assert time.monotonic() - started < 5, "logging waited on a dead server"
    assert tracker.logged_steps("val_accuracy") == [1]
    assert tracker.finish("FINISHED", flush_timeout=0.5) == 2  # the metric and the end
    assert "run `cnn-train sync`" in tracker.waiting_message()
    assert tracking.has_waiting_records(tracker.run_id)
    # The reaper leaves a run whose end waits on this machine alone.
    assert [s.run_id for s in tracking.waiting_spools()] == [tracker.run_id]


# --- against a real MLflow server killed mid-run -------------------------------------------------


class MlflowServer:
    """A lean MLflow server on a fixed port that a test can kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if not (self.folder / "mlflow.db").exists():
            new_store(self.folder / "mlflow.db")
        self.process = subprocess.Popen(
            [Path(sys.executable).with_name("mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination", str(self.folder / "mlartifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        from cnn_train.flows.ops.services import http_ok

        deadline = time.monotonic() + 120
        while not http_ok(f"{self.uri}/health"):
            assert time.monotonic() < deadline and self.process.poll() is None, "MLflow server did not start"
            time.sleep(0.3)

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def server(tmp_path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.kill()


def _env(prefect_api_url: str, server: MlflowServer, tmp_path: Path, real_data: Path) -> dict[str, str]:
    return os.environ | {
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": server.uri,
        "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
        # A run through a server on this machine files its artifacts under the project root (where
        # `cnn-train up`'s server keeps them): here, not in the checkout.
        "CNN_TRAIN_ROOT": str(tmp_path),
        "CNN_TRAIN_DATA_DIR": str(real_data),
        "CNN_TRAIN_HEARTBEAT_SECONDS": "2",
        "CNN_TRAIN_SPOOL_FLUSH_SECONDS": "3",
        # A run of a few seconds still samples the machine more than once.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        # MLflow's client gives up on a dead server at once here, so even this short outage is
        # longer than its retry budget: only the spool can carry the records across it.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "PYTHONPATH": str(ROOT),
    }


class Output:
    """A process's stdout read as it comes, so a test can act when a line appears."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            assert time.monotonic() < deadline, f"{pattern!r} never appeared:\n{''.join(self.lines)[-3000:]}"
            time.sleep(0.2)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def _epoch_seconds(text: str) -> list[float]:
    return [float(s) for s in re.findall(r"epoch \d+/\d+ \[.*\(([\d.]+) s,", text)]


def _only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn-train").experiment_id])
    return run


@pytest.mark.slow
def test_an_outage_mid_training_loses_nothing_and_does_not_slow_the_epochs(
    prefect_api_url, server, tmp_path, real_fashion_mnist_dir
):
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "4", "--sample-limit", "1000", "--test-limit", "100"],
        # The run's last flush waits for the server the test restarts: on a fast CPU the run can reach
        # its end before the restarted server answers.
        env=_env(prefect_api_url, server, tmp_path, real_fashion_mnist_dir) | {"CNN_TRAIN_SPOOL_FLUSH_SECONDS": "300"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    output = Output(process)
    output.wait_for(r"epoch 1/4")
    server.kill()
    outage_started = time.monotonic()
    output.wait_for(r"epoch 3/4")  # epochs 2 and 3 train with no tracking server
    # The outage: the server is back 3 minutes after it died. The run meanwhile trains,
    # evaluates and ends, its records waiting on disk; its last flush waits for the server.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_started)))
    server.start()
    outage = time.monotonic() - outage_started
    _, stderr = process.communicate(timeout=1200)
    text = output.text()
    assert process.returncode == 0, text[-3000:] + stderr
    assert "Traceback" not in stderr
    run = _only_run(server.uri)
    assert run.info.status == "FINISHED", stderr[-3000:]
    client = MlflowClient(server.uri)
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {key: model.params[key] for key in ("backend", "epochs", "sample_limit")} == {
        "backend": "torch", "epochs": "4", "sample_limit": "1000"
    }, "a model delivered from the spool keeps its params"
    seconds = _epoch_seconds(text)
    before, during = seconds[0], max(seconds[1:3])
    print(f"outage {outage:.0f} s; epoch seconds {seconds}; slowest outage epoch / epoch 1 = {during / before:.2f}")
    # Loose: the loop never waits on tracking (no retry stalls of tens of seconds); a loaded CI box is noisy.
    assert during < 2 * before + 2


@pytest.mark.slow
def test_a_server_that_never_returns_leaves_a_spool_that_doctor_fix_delivers(
    prefect_api_url, server, tmp_path, real_fashion_mnist_dir
):
    env = _env(prefect_api_url, server, tmp_path, real_fashion_mnist_dir)
    process = subprocess.Popen(
        [CLI, "run", "--epochs", "2", "--sample-limit", "600", "--test-limit", "100", "--register", "spooled-line"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    output = Output(process)
    output.wait_for(r"epoch 1/2")
    server.kill()
    _, stderr = process.communicate(timeout=1200)
    assert process.returncode == 0, output.text()[-3000:] + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"cnn-train: MLflow at {server.uri} (start it) did not answer: ") and "run `cnn-train sync`" in lines[0]
    server.start()
    fixed = subprocess.run([CLI, "doctor", "--fix"], env=env, capture_output=True, text=True, timeout=300)
    assert "ok   tracking spool: delivered the waiting records of 1 run(s)" in fixed.stdout, fixed.stdout + fixed.stderr
    run = _only_run(server.uri)
    assert run.info.status == "FINISHED"
    client = MlflowClient(server.uri)
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert "test_accuracy" in run.data.metrics
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id]), "the spooled model was not logged"
    assert client.list_artifacts(run.info.run_id, "report")
    assert any(key.startswith("system/cpu_utilization_percentage") for key in run.data.metrics)
    # --register waited with the model: it retried for minutes, then failed the run, and no version existed.
    version = client.get_model_version_by_alias("spooled-line", "champion")
    assert (version.run_id, run.data.tags["cnn_train.registered_model"]) == (run.info.run_id, "spooled-line/1")


def test_a_run_records_system_metrics_over_time(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracker = tracking.RunTracker.start("system", uri=store)
    with tracker.heartbeat(interval=60):
        time.sleep(4)
    tracker.finish("FINISHED")
    client = MlflowClient(store)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(tracker.run_id, key)
        assert len(history) >= 2, key  # over time, not one sample
        assert [m.step for m in history] == list(range(len(history)))


@pytest.mark.parametrize(
    ("owner", "ended", "protected"),
    [("this process", False, True), ("a dead process", False, False), ("a dead process", True, True)],
    ids=["writer-alive", "writer-killed", "end-waiting"],
)
def test_only_a_killed_writer_without_a_waiting_end_leaves_its_run_to_the_reaper(tmp_path, monkeypatch, owner, ended,
                                                                                   protected):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    spool = Spool("0123456789abcdef", uri=f"http://127.0.0.1:{free_port()}")
    spool.append("batch", {"metrics": [["loss", 1.0, 1, 1]]})
    if ended:
        spool.append("end", {"status": "FINISHED", "end_time": 2})
    if owner == "a dead process":
        exited = subprocess.Popen(["true"])
        exited.wait()
        import sqlite3

        with sqlite3.connect(spool.path) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'owner'", (f"{exited.pid}:0.000",))
    from cnn_train.flows.tracking.spool import not_abandoned

    assert not_abandoned(spool.run_id) is protected
