"""The stop request (a pruned trial): ``steps.train``'s ``on_epoch`` returns True and the training ends
after that epoch, recorded as stopped and with no model; a backend that keeps going is refused. And a
run records the versions of the packages its backend's distribution depends on.

The backend is the NumPy test plugin (tests/pyfunc_plugin), registered through a patched entry point,
on small synthetic data: no real dataset, a few seconds.
"""

from __future__ import annotations

import pytest

from cnn_train.flows import steps
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import validate_parameters
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins import registry
from cnn_train.plugins.conformance.data import images
from tests.plugin_fixtures import FakeDistribution, only_distributions
from tests.plugin_fixtures_numpy import PLUGIN_SOURCE  # noqa: F401  (imports the plugin from its source folder)
from tests.stores import new_store

PLUGIN_REQUIRES = ("cnn-train", "numpy>=1.26", "mlflow>=3.1")


@pytest.fixture
def numpy_plugin(monkeypatch):
    """The NumPy plugin and a variant that ignores the stop request, installed as one distribution."""
    only_distributions(monkeypatch, FakeDistribution("cnn-train-numpy-mlp", {
        "numpy-mlp": "cnn_train_numpy_mlp.backend:NumpyMLPBackend",
        "numpy-mlp-ignores-stop": "tests.plugin_fixtures_numpy:IgnoresStopRequest",
    }, version="0.1.0", requires=PLUGIN_REQUIRES))
    yield
    registry.refresh()


@pytest.fixture(scope="module")
def data() -> PreparedData:
    (x, y), (x_val, y_val), (x_test, y_test) = images(96, seed=1), images(32, seed=2), images(32, seed=3)
    return PreparedData(x, y, x_val, y_val, x_test, y_test, source="synthetic", digest="synthetic")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module: creating a SQLite store costs seconds (MLflow's schema migrations)."""
    return new_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture
def tracker(store, tmp_path, monkeypatch) -> RunTracker:
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    return RunTracker.start("stop-request", uri=store)


def _params(backend: str = "numpy-mlp", epochs: int = 3):
    return validate_parameters(backend=backend, architecture="dense", epochs=epochs, batch_size=16, seed=5)


@pytest.mark.parametrize(("stop_after", "stopped_at"), [(1, 1), (2, 2)], ids=["after-epoch-1", "after-epoch-2"])
def test_training_stops_after_the_epoch_that_asked(numpy_plugin, data, tracker, stop_after, stopped_at):
    outcome = steps.train(_params(), data, tracker, device="cpu", on_epoch=lambda m: m.epoch == stop_after)
    assert outcome.stopped_at_epoch == stopped_at
    assert [m.epoch for m in outcome.history.epochs] == list(range(1, stopped_at + 1))
    assert tracker.logged_steps("val_accuracy") == list(range(1, stopped_at + 1))
    assert outcome.model_uri is None  # a pruned training is not a model anyone will use


def test_asking_to_stop_at_the_last_epoch_is_a_complete_training(numpy_plugin, data, tracker):
    outcome = steps.train(_params(epochs=2), data, tracker, device="cpu", on_epoch=lambda m: True if m.epoch == 2 else None)
    assert outcome.stopped_at_epoch is None
    assert outcome.model_uri is not None and outcome.model_uri.startswith("models:/")


def test_a_backend_that_keeps_training_is_refused(numpy_plugin, data, tracker):
    with pytest.raises(steps.BackendOutputError, match=(
        r"backend 'numpy-mlp-ignores-stop' reported epochs \[1, 2, 3\] through on_epoch, on_epoch asked it to "
        r"stop after epoch 1, expected 1..1; the model is not logged"
    )):
        steps.train(_params("numpy-mlp-ignores-stop"), data, tracker, device="cpu", on_epoch=lambda m: True)


def test_run_records_the_versions_of_the_backends_framework(numpy_plugin):
    described = steps.run_description(_params())
    assert described["backend.distribution"] == "cnn-train-numpy-mlp"
    assert {key for key in described if key.startswith("version.")} == {
        "version.cnn-train", "version.mlflow", "version.prefect", "version.numpy"
    }
    import numpy

    assert described["version.numpy"] == numpy.__version__
