"""The recipe's plain steps, without Prefect: epochs reach MLflow as they end, and a resumed
training re-logs exactly what an interrupted attempt saved but did not log."""

from __future__ import annotations

import json
import shutil

import pytest

from cnn_train.flows import steps
from cnn_train.flows.params import validate_parameters
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import EpochMetrics
from tests.stores import new_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(real_fashion_mnist_dir, tmp_path_factory):
    params = validate_parameters(sample_limit=300, test_limit=100, epochs=3, seed=9)
    from cnn_train.flows.data import prepare_data

    data = prepare_data(real_fashion_mnist_dir, sample_limit=300, test_limit=100, seed=9,
                        validation_fraction=params.validation_fraction, cache_dir=tmp_path_factory.mktemp("cache"))
    return params, data


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    return RunTracker.start("steps", uri=new_store(tmp_path / "mlflow.db"))


def test_each_epoch_is_in_mlflow_when_it_ends(small_data, tracker, tmp_path):
    params, data = small_data
    seen_during_training: list[list[int]] = []
    outcome = steps.train(
        params, data, tracker, device="cpu",
        on_epoch=lambda metrics: seen_during_training.append(tracker.logged_steps("val_accuracy")),
    )
    assert seen_during_training == [[1], [1, 2], [1, 2, 3]]
    assert [m.epoch for m in outcome.history.epochs] == [1, 2, 3]
    assert outcome.model_uri.startswith("models:/")


def test_resume_relogs_saved_but_unlogged_epochs(small_data, tracker, tmp_path):
    params, data = small_data
    one_epoch = params.model_copy(update={"epochs": 1})
    steps.train(one_epoch, data, tracker, device="cpu")
    # An attempt that died after checkpointing epoch 1 but before logging it: a run with its checkpoint
    # and nothing in MLflow.
    fresh = RunTracker.start("steps", uri=tracker.uri)
    shutil.copytree(steps.checkpoint_dir(tracker.run_id), steps.checkpoint_dir(fresh.run_id))
    progress = json.loads((steps.checkpoint_dir(fresh.run_id) / "progress.json").read_text())
    assert [p["epoch"] for p in progress] == [1]
    outcome = steps.train(params, data, fresh, device="cpu")
    assert outcome.resumed_from_epoch == 1
    assert fresh.logged_steps("val_accuracy") == [1, 2, 3]
    assert fresh.logged_steps("loss") == [1, 2, 3]


def test_wrong_epoch_reports_are_refused(small_data, tracker, tmp_path, monkeypatch):
    params, data = small_data
    from cnn_train.backends.torch_backend import TorchBackend

    original = TorchBackend.train

    def skip_callbacks(self, data, config, *, on_epoch=None, initial_epoch=0):
        return original(self, data, config, on_epoch=None, initial_epoch=initial_epoch)

    monkeypatch.setattr(TorchBackend, "train", skip_callbacks)
    with pytest.raises(steps.BackendOutputError, match=r"reported epochs \[\] through on_epoch, expected 1..3; the model is not logged"):
        steps.train(params, data, tracker, device="cpu")


@pytest.mark.parametrize(
    ("method", "returning", "line"),
    [
        pytest.param("parameter_count", lambda self: "421642", "parameter_count() returned str '421642', expected int",
                     id="count-as-text"),
        pytest.param("loggable_model", lambda self: {"flavor": "pytorch"},
                     "loggable_model() returned dict {'flavor': 'pytorch'}, expected LoggableModel", id="model-as-dict"),
    ],
)
def test_a_result_of_the_wrong_type_is_refused_before_the_model_is_logged(
    small_data, tracker, monkeypatch, method, returning, line
):
    """A count as text failed in the report, a dict at model logging: tracebacks that never named the backend."""
    from cnn_train.backends.torch_backend import TorchBackend

    params, data = small_data
    monkeypatch.setattr(TorchBackend, method, returning)
    with pytest.raises(steps.BackendOutputError) as refused:
        steps.train(params.model_copy(update={"epochs": 1}), data, tracker, device="cpu")
    assert str(refused.value) == f"backend 'torch' broke the contract: {line}. Check it with `cnn-train check-backend torch`"
    assert not tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_the_evaluate_step_scores_as_the_backend_does(small_data, tracker, backend):
    """One pass over the test set: loss and accuracy from the report's probabilities are the backend's own."""
    from cnn_train.plugins import registry

    params, data = small_data
    params = params.model_copy(update={"backend": backend, "epochs": 1})
    trained = steps.train(params, data, tracker, device="cpu")
    evaluated = steps.evaluate(params, trained, data, device="cpu")
    own = registry.load_backend(backend)
    own.load(trained.checkpoint / "weights", params.model(), device="cpu")
    expected = own.evaluate(data.x_test, data.y_test)
    # The same images right (Keras's own metric is a float32 fraction).
    assert evaluated.evaluation.accuracy == pytest.approx(expected.accuracy, abs=0.5 / len(data.y_test))
    assert evaluated.evaluation.loss == pytest.approx(expected.loss, rel=1e-4)


@pytest.mark.parametrize(
    ("loss", "gone"), [(float("nan"), True), (float("inf"), True), (2.3e17, True), (2.31, False), (5e4, False)],
    ids=["nan", "inf", "blown-up", "chance", "high-but-finite"],
)
def test_a_loss_past_a_million_is_a_diverged_training(loss, gone):
    """Learning rate 1000: loss 2.3e17, a model that answers one class, registered as a challenger."""
    metrics = EpochMetrics(epoch=1, loss=loss, accuracy=0.1, val_loss=loss, val_accuracy=0.1, seconds=1.0, images_per_second=1.0)
    assert steps.diverged(metrics) is gone


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_a_diverging_training_stops_where_its_loss_stopped_being_a_number(small_data, tracker, backend):
    from mlflow import MlflowClient

    params, data = small_data
    params = params.model_copy(update={"backend": backend, "learning_rate": 1e9})  # 3 epochs
    shown: list[EpochMetrics] = []
    with pytest.raises(steps.TrainingDiverged) as caught:  # on_epoch asks to go on: the training stops all the same
        steps.train(params, data, tracker, device="cpu", on_epoch=lambda metrics: shown.append(metrics) or False)
    assert [(m.epoch, m.loss != m.loss) for m in shown] == [(1, True)], "the progress line shows the diverged epoch"
    assert str(caught.value) == (
        "training diverged: the training loss was nan in epoch 1 of 3, so the model is not logged; "
        "lower the learning rate (learning_rate 1e+09, batch_size 32)"
    )
    assert (caught.value.run_id, caught.value.epoch) == (tracker.run_id, 1)
    # The epoch is in MLflow for the loss curve; no checkpoint is left for a retry to resume.
    tracker.flush()
    history = MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value != m.value) for m in history] == [(1, True)]
    assert not steps.checkpoint_dir(tracker.run_id).exists()
    assert not MlflowClient(tracker.uri).search_logged_models(experiment_ids=[tracker.experiment_id])


def test_probabilities_rounded_as_float32_score_without_a_warning():
    """A backend's float32 probabilities as Python floats made sklearn warn "do not sum to one" in every run."""
    import warnings

    import numpy as np

    rows = np.random.default_rng(0).dirichlet(np.ones(10), size=50).astype(np.float32)
    labels = rows.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_floats = steps.evaluation_of(np.asarray(rows.tolist()), labels)
    assert as_floats.accuracy == 1.0
    assert as_floats.loss == pytest.approx(steps.evaluation_of(rows, labels).loss, rel=1e-6)
