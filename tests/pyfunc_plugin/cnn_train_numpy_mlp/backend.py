"""The backend: the lesson's dense network (Flatten, Dense 128 relu, Dense 10; 101,770 parameters)
trained with Adam in plain NumPy, on the CPU. MLflow has no NumPy flavor, so the model is handed to
the flow as an ``mlflow.pyfunc.PythonModel`` plus its weights file."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import numpy as np

from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import (
    BackendBase, Evaluation, LoggableModel, TrainHistory, Training, check_buildable, check_images,
    check_labels,
)
from cnn_train_numpy_mlp.network import hidden_and_logits, probabilities, softmax
from cnn_train_numpy_mlp.pyfunc_model import NumpyMLPModel

_STATE_FILE = "state.npz"
_LAYERS = ("hidden", "logits")
# Adam's constants, as Keras sets them.
_BETA1, _BETA2, _EPSILON = 0.9, 0.999, 1e-7


class NumpyMLPBackend(BackendBase):
    """The dense architecture on the CPU, in NumPy."""

    mlflow_flavor: ClassVar[str] = "pyfunc"
    architectures: ClassVar[tuple[str, ...]] = ("dense",)

    def __init__(self) -> None:
        self._config: ModelConfig | None = None
        self._weights: dict[str, np.ndarray] = {}
        self._moments: dict[str, np.ndarray] = {}
        self._step = 0
        self._exports: tempfile.TemporaryDirectory[str] | None = None

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        check_buildable(config, device, self.architectures, devices=("cpu",))
        rng = np.random.default_rng(seed)
        units = [int(np.prod(config.input_shape)), config.dense_units, config.num_classes]
        self._weights = {}
        for layer, fan_in, fan_out in zip(_LAYERS, units, units[1:]):
            limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform, as Keras initialises Dense
            self._weights[f"{layer}_kernel"] = rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)
            self._weights[f"{layer}_bias"] = np.zeros(fan_out, dtype=np.float32)
        self._moments = {f"{kind}_{name}": np.zeros_like(w) for name, w in self._weights.items() for kind in "mv"}
        self._step = 0
        self._config = config

    def _require(self) -> ModelConfig:
        if self._config is None:
            raise RuntimeError("numpy-mlp: call build() or load() first")
        return self._config

    def parameter_count(self) -> int:
        self._require()
        return sum(w.size for w in self._weights.values())

    def built_config(self) -> ModelConfig:
        return self._require()

    def fit(self, training: Training) -> TrainHistory:
        data, config = training.data, training.config

        def train_epoch(epoch: int) -> tuple[float, float]:
            # Seeded by the run seed and the epoch alone, so a resumed run shuffles like an unbroken one.
            order = np.random.default_rng([config.seed, epoch]).permutation(len(data.x_train))
            loss_sum, correct = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss, hits = self._step_on(data.x_train[batch], data.y_train[batch], config.learning_rate)
                loss_sum, correct = loss_sum + loss * len(batch), correct + hits
            return loss_sum / len(order), correct / len(order)

        return training.run_epochs(train_epoch, lambda: self.evaluate(data.x_val, data.y_val))

    def _step_on(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> tuple[float, int]:
        """One Adam step on a batch of softmax cross-entropy; returns the batch's mean loss and correct count."""
        flat = x.reshape(len(x), -1)
        hidden, logits = hidden_and_logits(self._weights, x)
        proba = softmax(logits)
        rows = np.arange(len(y))
        loss = float(-np.log(np.maximum(proba[rows, y], 1e-12)).mean())
        d_logits = proba
        d_logits[rows, y] -= 1.0
        d_logits /= len(y)
        d_hidden = (d_logits @ self._weights["logits_kernel"].T) * (hidden > 0)
        grads = {
            "logits_kernel": hidden.T @ d_logits,
            "logits_bias": d_logits.sum(axis=0),
            "hidden_kernel": flat.T @ d_hidden,
            "hidden_bias": d_hidden.sum(axis=0),
        }
        self._step += 1
        scale = learning_rate * np.sqrt(1 - _BETA2**self._step) / (1 - _BETA1**self._step)
        for name, grad in grads.items():
            m, v = self._moments[f"m_{name}"], self._moments[f"v_{name}"]
            m += (1 - _BETA1) * (grad - m)
            v += (1 - _BETA2) * (grad * grad - v)
            self._weights[name] -= (scale * m / (np.sqrt(v) + _EPSILON)).astype(np.float32)
        return loss, int((logits.argmax(axis=1) == y).sum())

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        config = self._require()
        check_images(x, config)
        check_labels(y, len(x), config.num_classes)
        proba = self.predict_proba(x, batch_size=batch_size)
        picked = np.maximum(proba[np.arange(len(y)), y], 1e-12)
        return Evaluation(loss=float(-np.log(picked).mean()), accuracy=float((proba.argmax(axis=1) == y).mean()))

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        check_images(x, self._require())
        return np.concatenate([probabilities(self._weights, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        raise ValueError("numpy-mlp builds the dense architecture, which has no convolution feature maps")

    def first_conv_kernels(self) -> np.ndarray:
        raise ValueError("numpy-mlp builds the dense architecture, which has no convolution kernels")

    def save(self, path: Path) -> None:
        self._require()
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / _STATE_FILE, step=np.int64(self._step), **self._weights, **self._moments)

    def load(self, path: Path, config: ModelConfig, *, device: str) -> None:
        state_file = Path(path) / _STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"no numpy-mlp state at {state_file}; was it written by NumpyMLPBackend.save?")
        self.build(config, device=device, seed=0)
        with np.load(state_file) as saved:
            self._weights = {name: saved[name] for name in self._weights}
            self._moments = {name: saved[name] for name in self._moments}
            self._step = int(saved["step"])

    def loggable_model(self) -> LoggableModel:
        self._require()
        # The weights go to a file MLflow copies into the model; it lives as long as this backend.
        self._exports = self._exports or tempfile.TemporaryDirectory(prefix="cnn-train-numpy-mlp-")
        weights = Path(self._exports.name) / "weights.npz"
        np.savez(weights, **self._weights)
        return LoggableModel(
            flavor="pyfunc",
            model=NumpyMLPModel(),
            artifacts={"weights": str(weights)},
            pip_requirements=(f"numpy=={version('numpy')}", f"mlflow=={version('mlflow')}"),
            # Ship this package with the model, so it loads where the plugin is not installed.
            extra={"code_paths": [str(Path(__file__).parent)]},
        )
