"""Task bodies through ``.fn``, without a flow run: the thin layer between Prefect and the steps."""

from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

from cnn_train.flows.params import validate_parameters
from cnn_train.flows.tasks import prep_task, progress_line
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
