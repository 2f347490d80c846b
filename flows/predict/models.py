"""The model a prediction uses: chosen (named, or the default), loaded through MLflow's pyfunc API so
any backend's model works, and checked to take 28x28x1 images and give ten probabilities."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnn_train.flows import tracking
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.params import RunParameters
from cnn_train.flows.predict.images import SIDE
from cnn_train.flows.tracking import ModelChoice
from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from cnn_train.plugins.contract import probabilities_problem

INPUT_SHAPE = (SIDE, SIDE, 1)
#: The experiment whose models are the default: where `cnn-train run` trains unless told otherwise.
TRAINING_EXPERIMENT: str = RunParameters.model_fields["experiment"].default


class UnusableModelError(ExpectedFailure, ValueError):
    """A model that does not take 28x28x1 images or does not give one probability per class."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A pyfunc model that takes ``(n, 28, 28, 1)`` float32 images, and how it was chosen."""

    choice: ModelChoice
    pyfunc: Any

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``(n, 10)`` class probabilities, in batches, refused when they are not probabilities."""
        # A Keras model's predict draws a progress bar on stdout, which carries the predictions, and MLflow's
        # wrapper passes no verbose=0 (Keras's own switch is per thread, and predict draws from another).
        quiet = "keras" in self.pyfunc.metadata.flavors
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            parts = [
                np.asarray(self.pyfunc.predict(images[start : start + batch_size]), dtype=np.float64)
                for start in range(0, len(images), batch_size)
            ]
        probabilities = np.concatenate(parts) if parts else np.empty((0, len(FASHION_MNIST_CLASSES)))
        _check_probabilities(self.choice.model_uri, probabilities, len(images))
        return probabilities


def choose_model(spec: str | None, *, uri: str | None = None) -> ModelChoice:
    """The model ``spec`` names, or with no ``spec`` the default: the ``cnn-train`` experiment's best
    registered champion, else its latest finished training run's model."""
    if spec:
        return tracking.locate(spec, uri=uri, experiment=TRAINING_EXPERIMENT)
    return tracking.default_model(uri=uri, experiment=TRAINING_EXPERIMENT)


def load_model(choice: ModelChoice, *, uri: str | None = None) -> LoadedModel:
    """Load with ``mlflow.pyfunc.load_model`` and check the signature before any image is classified."""
    pyfunc = tracking.load_pyfunc(choice.model_uri, uri or tracking.tracking_uri(), experiment=TRAINING_EXPERIMENT)
    check_signature(choice.model_uri, pyfunc.metadata.get_input_schema(), pyfunc.metadata.get_output_schema())
    return LoadedModel(choice, pyfunc)


def check_signature(model_uri: str, inputs: Any, outputs: Any) -> None:
    """Refuse, in one line, a model whose signature does not take float ``(-1, 28, 28, 1)`` images
    or does not give ten values per image."""
    wanted = f"cnn-train predicts with models that take float images (-1, {SIDE}, {SIDE}, 1)"
    if inputs is None:
        raise UnusableModelError(f"{model_uri} has no input signature; {wanted}")
    if not inputs.is_tensor_spec():
        raise UnusableModelError(f"{model_uri} takes columns {inputs.input_names()}, not images; {wanted}")
    specs = inputs.inputs
    shape = tuple(specs[0].shape) if len(specs) == 1 else None
    if shape is None or shape[1:] != INPUT_SHAPE or specs[0].type.kind != "f":
        described = ", ".join(f"{spec.type} {tuple(spec.shape)}" for spec in specs)
        raise UnusableModelError(f"{model_uri} takes {described}; {wanted}")
    if outputs is not None and outputs.is_tensor_spec():
        out_shape = tuple(outputs.inputs[0].shape)
        if len(outputs.inputs) != 1 or out_shape[-1] != len(FASHION_MNIST_CLASSES):
            raise UnusableModelError(
                f"{model_uri} gives {out_shape} per batch, not one probability for each of the "
                f"{len(FASHION_MNIST_CLASSES)} Fashion-MNIST classes"
            )


def _check_probabilities(model_uri: str, probabilities: np.ndarray, n: int) -> None:
    problem = probabilities_problem(probabilities, n, len(FASHION_MNIST_CLASSES), what="the model")
    if problem:
        raise UnusableModelError(f"{model_uri} is not a Fashion-MNIST classifier: {problem}")
