"""The Keras backend's lean training step stays a Keras training: the same weights and metrics as Keras's
own ``train_step``, Keras's step for anything it does not cover, and callbacks called as Keras calls them."""

from __future__ import annotations

import numpy as np
import pytest

from cnn_train.backends import keras_backend
from cnn_train.backends.keras_backend import EpochCallbacks, KerasBackend
from cnn_train.plugins.config import ModelConfig, TrainConfig
from tests.test_backends import measured, synthetic_data

keras = keras_backend.keras


def trained(*, keras_own_step: bool, epochs: int = 2) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    backend = KerasBackend()
    backend.build(ModelConfig(), device="cpu", seed=3)
    if keras_own_step:
        # Another loss object than compile_plain's: the model then takes Keras's own step.
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        backend._model.compile(optimizer=backend._model.optimizer, loss=loss, metrics=["accuracy"])
    history = backend.train(synthetic_data(), TrainConfig(epochs=epochs, seed=3))
    return [np.array(w) for w in backend._model.get_weights()], [measured(m) for m in history.epochs]


def test_the_lean_step_trains_exactly_as_keras_own() -> None:
    lean_weights, lean_metrics = trained(keras_own_step=False)
    own_weights, own_metrics = trained(keras_own_step=True)
    for lean, own in zip(lean_weights, own_weights, strict=True):
        np.testing.assert_array_equal(lean, own)
    for lean, own in zip(lean_metrics, own_metrics, strict=True):
        assert lean == pytest.approx(own, rel=1e-5)


def test_other_metrics_and_sample_weights_take_keras_own_step() -> None:
    backend = KerasBackend()
    backend.build(ModelConfig(architecture="dense"), device="cpu", seed=0)
    model = backend._model
    model.compile(
        optimizer=model.optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")],
    )
    data = synthetic_data(64)
    history = model.fit(data.x_train, data.y_train, sample_weight=np.ones(len(data.y_train)), epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "top2"}


class BatchCounter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.logs: list[dict[str, float]] = []

    def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
        self.logs.append(dict(logs or {}))


def test_a_batch_callback_still_sees_every_batch_with_keras_logs() -> None:
    backend = KerasBackend()
    backend.build(ModelConfig(architecture="dense"), device="cpu", seed=0)
    model, data, counter = backend._model, synthetic_data(96), BatchCounter()
    callbacks = EpochCallbacks([counter], add_history=True, model=model, epochs=1)
    model.fit(data.x_train, data.y_train, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    assert len(counter.logs) == -(-len(data.y_train) // 16)
    assert all(set(logs) == {"loss", "accuracy"} for logs in counter.logs)
    last = counter.logs[-1]
    assert last["loss"] == pytest.approx(model.history.history["loss"][-1], rel=1e-5)


def _updated_by(optimizer: keras.optimizers.Optimizer, steps: int = 5) -> list[np.ndarray]:
    """Variables shaped like the lesson's first convolution and hidden layer after ``steps`` updates with
    the same gradients each time (different per element, some near zero), from the same start."""
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 1, 32), (32,), (3136, 128)]
    variables = [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in shapes]
    grads = [keras.ops.convert_to_tensor((rng.normal(size=shape) * 10.0 ** rng.integers(-6, 1, shape)).astype("float32"))
             for shape in shapes]
    for _ in range(steps):
        optimizer.apply(grads, variables)
    return [np.array(variable) for variable in variables]


@pytest.mark.parametrize(
    ("options", "fused"),
    [
        pytest.param({}, True, id="default"),
        pytest.param({"learning_rate": 3e-3, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}, True, id="other-settings"),
        pytest.param({"amsgrad": True}, False, id="amsgrad-keras-own-update"),
    ],
)
def test_fused_adam_updates_as_keras_adam(monkeypatch: pytest.MonkeyPatch, options: dict, fused: bool) -> None:
    from torch.optim import adam as torch_adam

    calls = []
    real = torch_adam.adam
    # A spy: counts the calls and runs the real kernel, so the fused path is the one that updated.
    monkeypatch.setattr(torch_adam, "adam", lambda *a, **k: calls.append(k["fused"]) or real(*a, **k))
    ours = _updated_by(keras_backend.FusedAdam(**options))
    theirs = _updated_by(keras.optimizers.Adam(**options))
    assert calls == [True] * 5 if fused else calls == []
    for mine, keras_own in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine, keras_own, rtol=1e-6, atol=1e-7)


def test_the_keras_backend_trains_with_fused_adam_a_keras_optimizer() -> None:
    backend = KerasBackend()
    backend.build(ModelConfig(architecture="dense"), device="cpu", seed=0)
    optimizer = backend._model.optimizer
    assert isinstance(optimizer, keras.optimizers.Adam) and type(optimizer) is keras_backend.FusedAdam
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is keras_backend.FusedAdam and restored.get_config() == optimizer.get_config()


def _numpy(tensor: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def test_dropout_drops_in_training_on_the_fast_path_model() -> None:
    # Not a layer the fast path fuses: the model runs as Keras runs it, so Dropout sees `training`.
    inputs = np.random.default_rng(0).normal(size=(64, 32)).astype("float32")
    model = keras_backend.DirectSequential([keras.Input((32,)), keras.layers.Dense(32), keras.layers.Dropout(0.5, seed=1)])
    kept = _numpy(model(inputs, training=False))
    dropped = _numpy(model(inputs, training=True))
    zeroed = dropped == 0
    assert 0.3 < zeroed.mean() < 0.7, "training=True did not reach Dropout"
    np.testing.assert_allclose(dropped[~zeroed], 2 * kept[~zeroed], rtol=1e-5)


def test_batch_normalization_uses_the_batch_in_training_as_in_keras_sequential() -> None:
    inputs = 3 + np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    layers = [keras.Input((8,)), keras.layers.Dense(8), keras.layers.BatchNormalization()]
    ours, theirs = keras_backend.DirectSequential(layers), keras.Sequential(layers)  # the very same layers
    for training in (True, False):
        np.testing.assert_allclose(
            _numpy(ours(inputs, training=training)), _numpy(theirs(inputs, training=training)), rtol=1e-5, atol=1e-5
        )
    assert not np.allclose(_numpy(ours(inputs, training=True)), _numpy(ours(inputs, training=False)), atol=1e-3)


@pytest.mark.parametrize("architecture", ["cnn", "dense"])
def test_the_shipped_networks_take_the_fused_path(monkeypatch: pytest.MonkeyPatch, architecture: str) -> None:
    from cnn_train.backends import keras_direct

    calls = []
    real = keras_direct.F.linear
    monkeypatch.setattr(keras_direct.F, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = keras_backend.build_model(ModelConfig(architecture=architecture))
    model(np.zeros((2, 28, 28, 1), dtype="float32"), training=True)
    assert len(calls) == 2, "a shipped layer lost its fused op: the Keras backend would train slower"


def test_a_subclass_gives_fit_keras_callbacks_of_its_own() -> None:
    """A Keras user's callbacks (here a batch counter and EarlyStopping) run in the backend's own fit."""

    class Counted(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batches, self.epochs = 0, []

        def on_train_batch_end(self, batch, logs=None) -> None:
            self.batches += 1

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.epochs.append(sorted(logs))

    counted = Counted()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after epoch 2

    class WithCallbacks(KerasBackend):
        def keras_callbacks(self) -> list:
            return [counted, stop]

    backend = WithCallbacks()
    backend.build(ModelConfig(architecture="dense"), device="cpu", seed=0)
    history = backend.train(synthetic_data(), TrainConfig(epochs=5, batch_size=32, seed=0))
    assert len(history.epochs) == 2 and stop.stopped_epoch == 1
    assert counted.batches == 2 * 6  # 192 training images in batches of 32
    assert counted.epochs == [["accuracy", "loss", "val_accuracy", "val_loss"]] * 2
