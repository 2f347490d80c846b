"""A third-party cnn-train backend: the dense network (Flatten, Dense 128 relu, Dense 10) as a
scikit-learn ``MLPClassifier``. It has exactly the lesson's 101,770 parameters and trains with
Adam one epoch per ``partial_fit`` call, so the flow sees every epoch as it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import joblib
import numpy as np
import sklearn
from sklearn.metrics import accuracy_score, log_loss
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer

from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import (
    BackendBase, Evaluation, LoggableModel, TrainHistory, Training, check_buildable, check_images,
    check_labels,
)

_MODEL_FILE = "pipeline.joblib"
#: The pipeline's types skops does not trust by default: the Flatten step's function and Adam's state.
SKOPS_TRUSTED_TYPES = ("numpy.reshape", "sklearn.neural_network._stochastic_optimizers.AdamOptimizer")


class SklearnMLPBackend(BackendBase):
    """The dense architecture on the CPU with scikit-learn."""

    mlflow_flavor: ClassVar[str] = "sklearn"
    architectures: ClassVar[tuple[str, ...]] = ("dense",)

    def __init__(self) -> None:
        self._config: ModelConfig | None = None
        self._pipeline: Pipeline | None = None

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        check_buildable(config, device, self.architectures, devices=("cpu",))
        self._config = config
        mlp = MLPClassifier(
            hidden_layer_sizes=(config.dense_units,),
            activation="relu",
            solver="adam",
            alpha=0.0,  # the lesson's network has no weight decay
            random_state=seed,
            shuffle=True,
        )
        # Images arrive as (n, h, w, c); the MLP wants flat rows, like the lesson's Flatten layer.
        self._pipeline = make_pipeline(FunctionTransformer(np.reshape, kw_args={"shape": (-1, self._flat())}), mlp)

    def _flat(self) -> int:
        assert self._config is not None
        h, w, c = self._config.input_shape
        return h * w * c

    def _require(self) -> tuple[ModelConfig, Pipeline]:
        if self._config is None or self._pipeline is None:
            raise RuntimeError("sklearn-mlp: call build() or load() first")
        return self._config, self._pipeline

    @property
    def _mlp(self) -> MLPClassifier:
        return self._require()[1][-1]

    def parameter_count(self) -> int:
        config, _ = self._require()
        units = [self._flat(), config.dense_units, config.num_classes]
        return sum(a * b + b for a, b in zip(units, units[1:]))

    def built_config(self) -> ModelConfig:
        return self._require()[0]

    def fit(self, training: Training) -> TrainHistory:
        model_config, pipeline = self._require()
        data, config = training.data, training.config
        mlp = self._mlp
        mlp.set_params(batch_size=config.batch_size, learning_rate_init=config.learning_rate)
        flat = data.x_train.reshape(len(data.x_train), -1)
        classes = np.arange(model_config.num_classes)

        def train_epoch(epoch: int) -> tuple[float, float]:
            mlp.partial_fit(flat, data.y_train, classes=classes)
            return mlp.loss_, accuracy_score(data.y_train, pipeline.predict(data.x_train))

        return training.run_epochs(train_epoch, lambda: self.evaluate(data.x_val, data.y_val))

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        config, _ = self._require()
        check_images(x, config)
        check_labels(y, len(x), config.num_classes)
        proba = self.predict_proba(x)
        labels = np.arange(config.num_classes)
        return Evaluation(
            loss=float(log_loss(y, proba, labels=labels)),
            accuracy=float(accuracy_score(y, proba.argmax(axis=1))),
        )

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        config, pipeline = self._require()
        check_images(x, config)
        return pipeline.predict_proba(x).astype(np.float32)

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        raise ValueError("sklearn-mlp builds the dense architecture, which has no convolution feature maps")

    def first_conv_kernels(self) -> np.ndarray:
        raise ValueError("sklearn-mlp builds the dense architecture, which has no convolution kernels")

    def save(self, path: Path) -> None:
        _, pipeline = self._require()
        path.mkdir(parents=True, exist_ok=True)
        joblib.dump(pipeline, path / _MODEL_FILE)

    def load(self, path: Path, config: ModelConfig, *, device: str) -> None:
        self.build(config, device=device, seed=0)
        self._pipeline = joblib.load(path / _MODEL_FILE)

    def loggable_model(self) -> LoggableModel:
        _, pipeline = self._require()
        return LoggableModel(
            flavor=self.mlflow_flavor,
            model=pipeline,
            pip_requirements=(f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}"),
            extra={
                # pyfunc should serve probabilities, not class labels.
                "pyfunc_predict_fn": "predict_proba",
                # MLflow saves scikit-learn models with skops, which loads only the types it is told
                # to trust: exactly the two this pipeline holds beyond scikit-learn's own estimators.
                "skops_trusted_types": list(SKOPS_TRUSTED_TYPES),
            },
        )
