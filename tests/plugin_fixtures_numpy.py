"""The NumPy test plugin (tests/pyfunc_plugin, a framework MLflow has no flavor for) importable in-process,
and deliberately broken variants of it, each breaking one promise the conformance kit checks.

NumPy trains the dense network in milliseconds, so the whole kit runs against each variant cheaply.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

#: The plugin's source folder.
PLUGIN_SOURCE = Path(__file__).resolve().parent / "pyfunc_plugin"


def _import_plugin_package() -> None:
    """Import the plugin's package from its source folder as an installed plugin's would import, without
    putting the folder on sys.path: the egg-info a pip build leaves there would make importlib.metadata
    see the plugin as installed, and the registry list it, in every later test."""
    if "cnn_train_numpy_mlp" in sys.modules:
        return
    package = PLUGIN_SOURCE / "cnn_train_numpy_mlp"
    spec = importlib.util.spec_from_file_location(
        "cnn_train_numpy_mlp", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_import_plugin_package()

from cnn_train_numpy_mlp.backend import NumpyMLPBackend  # noqa: E402  (needs the package imported above)

from cnn_train.plugins.contract import LoggableModel  # noqa: E402


class UnknownFlavor(NumpyMLPBackend):
    """Names an MLflow flavor that does not exist."""

    mlflow_flavor = "no_such_flavor"

    def loggable_model(self) -> LoggableModel:
        return dataclasses.replace(super().loggable_model(), flavor=self.mlflow_flavor)


class FlavorMismatch(NumpyMLPBackend):
    """Declares MLflow's sklearn flavor but hands the flow a pyfunc model."""

    mlflow_flavor = "sklearn"


class NoRealResume(NumpyMLPBackend):
    """Ignores ``initial_epoch`` and reloads only the weights, so a retried training starts over."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        return super().train(data, config, on_epoch=on_epoch)

    def load(self, path, config, *, device):
        super().load(path, config, device=device)
        self._moments = {name: moment * 0 for name, moment in self._moments.items()}
        self._step = 0


class FixedInitialWeights(NumpyMLPBackend):
    """Initialises every model alike, whatever the seed (its shuffles still follow the run's seed)."""

    def build(self, config, *, device, seed):
        super().build(config, device=device, seed=0)


class IgnoresTheSeed(NumpyMLPBackend):
    """Builds by the seed, then starts training over from weights of seed 0: a sweep over seed gave identical trials."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        if initial_epoch == 0:
            super().build(self._config, device="cpu", seed=0)
        return super().train(data, config.model_copy(update={"seed": 0}), on_epoch=on_epoch, initial_epoch=initial_epoch)


class ForgetsOptimizerState(NumpyMLPBackend):
    """Resumes from the right epoch, but with a fresh optimizer: the losses drift from an unbroken run."""

    def load(self, path, config, *, device):
        super().load(path, config, device=device)
        self._moments = {name: moment * 0 for name, moment in self._moments.items()}
        self._step = 0


class IgnoresStopRequest(NumpyMLPBackend):
    """Trains every epoch whatever ``on_epoch`` answers."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        def keep_going(metrics):
            if on_epoch is not None:
                on_epoch(metrics)

        return super().train(data, config, on_epoch=keep_going, initial_epoch=initial_epoch)


class ReadsVisibleDevices(NumpyMLPBackend):
    """Decides for itself whether a GPU is there, from the environment."""

    def build(self, config, *, device, seed):
        self.gpu_visible = bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
        super().build(config, device=device, seed=seed)


class RunsNvidiaSmi(NumpyMLPBackend):
    """Asks the driver's tool which GPUs there are."""

    def build(self, config, *, device, seed):
        try:
            subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, check=False)
        except OSError:
            pass  # no such tool here: it looked all the same
        super().build(config, device=device, seed=seed)


class AcceptsAnyDevice(NumpyMLPBackend):
    """Quietly trains on the CPU whatever device it is given."""

    def build(self, config, *, device, seed):
        super().build(config, device="cpu", seed=seed)


class ShufflesWithTheGlobalGenerator(NumpyMLPBackend):
    """Seeds NumPy's process-wide generator with the run's seed and shuffles with it: deterministic alone,
    but a trial in another thread reseeding it changes this one's shuffles."""

    def fit(self, training):
        import numpy as np

        np.random.seed(training.config.seed)
        np.random.permutation(len(training.data.x_train))
        return super().fit(training)


class PredictsWithTheGlobalGenerator(NumpyMLPBackend):
    """Trains and evaluates cleanly, and predicts the right rows, but predicts them in an order drawn from
    NumPy's process-wide generator: a user's own draws after a prediction are no longer the ones they seeded."""

    def evaluate(self, x, y, *, batch_size=256):
        with mock.patch.object(self, "predict_proba", super().predict_proba):  # validation stays clean
            return super().evaluate(x, y, batch_size=batch_size)

    def predict_proba(self, x, *, batch_size=256):
        import numpy as np

        order = np.random.permutation(len(x))
        probabilities = np.empty((len(x), self.built_config().num_classes), dtype=np.float32)
        probabilities[order] = super().predict_proba(x[order], batch_size=batch_size)
        return probabilities


class _BadProbabilities(NumpyMLPBackend):
    """Trains and evaluates cleanly; only what ``predict_proba`` hands out is wrong (:meth:`_spoil`)."""

    def fit(self, training):
        with mock.patch.object(self, "predict_proba", super().predict_proba):
            return super().fit(training)

    def evaluate(self, x, y, *, batch_size=256):
        with mock.patch.object(self, "predict_proba", super().predict_proba):
            return super().evaluate(x, y, batch_size=batch_size)

    def predict_proba(self, x, *, batch_size=256):
        return self._spoil(super().predict_proba(x, batch_size=batch_size))

    def _spoil(self, probabilities):
        raise NotImplementedError


class TransposedProbabilities(_BadProbabilities):
    """Hands out its probabilities classes first, ``(10, n)``."""

    def _spoil(self, probabilities):
        return probabilities.T


class HalvedProbabilities(_BadProbabilities):
    """Rows summing to 0.5, as a network whose last layer is not a softmax might."""

    def _spoil(self, probabilities):
        return probabilities / 2


class AsksJaxForDevices(NumpyMLPBackend):
    """Builds only after asking an imported JAX for its devices, with the arguments in ``JAX_CALL``."""

    JAX_CALL: tuple[tuple, dict] = ((), {})

    def build(self, config, *, device, seed):
        args, kwargs = self.JAX_CALL
        sys.modules["jax"].devices(*args, **kwargs)
        super().build(config, device=device, seed=seed)


class MisspeltConfigField(NumpyMLPBackend):
    """A plugin author's typo: ``config.lr`` for ``config.learning_rate``."""

    def fit(self, training):
        self.rate = training.config.lr
        return super().fit(training)


class CountsAsText(NumpyMLPBackend):
    """Returns its parameter count as text: the run's report failed on it, as a traceback."""

    def parameter_count(self):
        return f"{super().parameter_count()}"


class TrainReturnsNothing(NumpyMLPBackend):
    """Trains and reports every epoch, but returns None instead of its TrainHistory."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        super().train(data, config, on_epoch=on_epoch, initial_epoch=initial_epoch)


class EvaluatesToATuple(NumpyMLPBackend):
    """``evaluate`` returns ``(loss, accuracy)``, not an Evaluation; its fit validates each epoch with it."""

    def evaluate(self, x, y, *, batch_size=256):
        result = super().evaluate(x, y, batch_size=batch_size)
        return result.loss, result.accuracy


class LogsADict(NumpyMLPBackend):
    """``loggable_model`` returns a dict of what a LoggableModel holds."""

    def loggable_model(self):
        return dataclasses.asdict(super().loggable_model())


class LogsARun(NumpyMLPBackend):
    """Keeps the contract, but records its training in MLflow itself."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        import mlflow

        with mlflow.start_run():
            mlflow.log_metric("loss", 1.0)
        return super().train(data, config, on_epoch=on_epoch, initial_epoch=initial_epoch)


class LeavesARunActive(NumpyMLPBackend):
    """Starts an MLflow run while training and never ends it."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        import mlflow

        mlflow.start_run()
        return super().train(data, config, on_epoch=on_epoch, initial_epoch=initial_epoch)


class FailsToTrain(NumpyMLPBackend):
    """A backend whose training fails as a framework's might (out of memory, a driver error)."""

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        raise RuntimeError("the framework ran out of memory")
