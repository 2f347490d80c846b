"""Task bodies through ``.fn``, without a flow run: the thin layer between Prefect and the steps."""

from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.params import validate_parameters
from cnn_train.flows.steps import TrainingDiverged
from cnn_train.flows.tasks import IN_MEMORY, prep_task, progress_line, retry_unless_deterministic
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import EpochMetrics
from tests.stores import new_store


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    return RunTracker.start("tasks", uri=new_store(tmp_path / "mlflow.db"))


def test_prep_task_places_itself_prepares_and_records_the_datasets(tracker, real_fashion_mnist_dir):
    params = validate_parameters(sample_limit=200, test_limit=50, data_dir=str(real_fashion_mnist_dir))
    with disable_run_logger():
        data = prep_task.fn(params, tracker)
    assert data.summary() == {"train": 180, "validation": 20, "test": 50}
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["device.prep"] == "cpu"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion-mnist-train", "fashion-mnist-test"}


@pytest.mark.parametrize(
    "epoch, bar",
    [pytest.param(1, "[####----------------]", id="first-of-five"), pytest.param(5, "[####################]", id="last")],
)
def test_progress_line_shows_the_epoch_its_metrics_and_speed(epoch, bar):
    metrics = EpochMetrics(epoch, 0.5, 0.8, 0.6, 0.75, 12.34, 4321.0)
    line = progress_line(metrics, 5, "cnn")
    assert line.startswith(f"cnn epoch {epoch}/5 {bar} loss 0.5000 acc 0.8000")
    assert line.endswith("(12.3 s, 4321 img/s)")


@pytest.mark.parametrize(
    "error, attempts",
    [
        pytest.param(ConnectionError("the MLflow server went away"), 2, id="lost-connection-retried"),
        pytest.param(RuntimeError("CUDA error: an illegal memory access"), 2, id="runtime-error-retried"),
        pytest.param(AttributeError("'TrainConfig' object has no attribute 'lr'"), 1, id="plugin-bug-not-retried"),
        pytest.param(ValueError("architecture 'x' is not supported here"), 1, id="refused-input-not-retried"),
        pytest.param(ExpectedFailure("the data folder lacks a file"), 1, id="expected-failure-not-retried"),
        pytest.param(TrainingDiverged("training diverged"), 1, id="diverged-not-retried"),
    ],
)
def test_the_train_tasks_retry_only_what_may_not_happen_again(prefect_api_url, error, attempts):
    """Through Prefect's own retry machinery, with the condition the train and trial tasks carry."""
    from prefect import flow, task

    calls: list[int] = []

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_deterministic, **IN_MEMORY)
    def failing() -> None:
        calls.append(1)
        raise error

    @flow(name="retry-condition")
    def attempt() -> None:
        failing()

    with pytest.raises(type(error)):
        attempt()
    assert len(calls) == attempts
