"""The backend's model can be logged by the flow and served: through the project's own tracking code
into a temporary MLflow store, back out through ``mlflow.pyfunc.load_model``, predicting as the backend does."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from cnn_train.plugins.conformance.data import images
from cnn_train.plugins.conformance.isolation import fresh_tracking_store
from cnn_train.plugins.conformance.subject import Subject
from cnn_train.plugins.contract import LoggableModel, probabilities_problem, returned_problem

#: The loaded model's probabilities must match ``predict_proba``'s within this (absolute): the same
#: float32 network, though possibly exported (PyTorch's pt2) or re-read, so only rounding may differ.
LOGGED_MODEL_TOLERANCE = 1e-5
#: Images the loaded model predicts.
_IMAGES = 8


def check_model_logging(subject: Subject) -> None:
    """``loggable_model()`` is logged by the flow's tracking code (``RunTracker.log_model``, with the
    flow's signature and input example) into a temporary store, loads with ``mlflow.pyfunc.load_model``,
    and its probabilities match ``predict_proba`` on the same images."""
    # The kit is in plugins/, which never imports flows/ at import time (imports point flows -> plugins);
    # this check is about the flow's real tracking code, so it imports it only when it runs.
    import mlflow.pyfunc

    from cnn_train.flows.tracking import ModelRecord, RunTracker

    backend, _ = subject.trained()
    loggable = backend.loggable_model()
    assert (problem := returned_problem("loggable_model", loggable, LoggableModel)) is None, problem
    assert loggable.flavor == subject.cls.mlflow_flavor, (
        f"loggable_model().flavor is {loggable.flavor!r} but the class's mlflow_flavor is {subject.cls.mlflow_flavor!r}; "
        "make them the same (the backend list and the logged model must agree)"
    )
    config = subject.reference_config()
    x, _ = images(_IMAGES, seed=8)
    want = np.asarray(backend.predict_proba(x))
    # Compared below with the loaded model's: a wrong shape here is predict_proba's fault, said as such.
    problem = probabilities_problem(want, _IMAGES, config.num_classes)
    assert problem is None, problem
    with (
        tempfile.TemporaryDirectory() as tmp,
        fresh_tracking_store(Path(tmp)) as uri,
        # Whatever the tracking code keeps on disk stays in the throwaway folder, not the user's state.
        mock.patch.dict(os.environ, {"CNN_TRAIN_STATE_DIR": str(Path(tmp) / "state")}),
    ):
        # The run is never ended: the store is thrown away with it, and ending it would start the
        # tracking code's delivery machinery for nothing.
        tracker = RunTracker.start("cnn-train-conformance", uri=uri, run_name="model_logging")
        # Two images as the example, as the flow logs them.
        model_uri = tracker.log_model(loggable, ModelRecord(config.input_shape, config.num_classes, input_example=x[:2]))
        assert model_uri is not None, "the tracking code kept the model for later instead of logging it"
        got = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(x))
    assert got.shape == (_IMAGES, config.num_classes), (
        f"the logged model, loaded with mlflow.pyfunc.load_model, predicted shape {got.shape}, "
        f"expected {(_IMAGES, config.num_classes)} probabilities"
    )
    worst = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert worst <= LOGGED_MODEL_TOLERANCE, (
        f"the logged model's probabilities differ from predict_proba by up to {worst:.3g} "
        f"(tolerance {LOGGED_MODEL_TOLERANCE:g}): log the model that predict_proba uses, with a softmax output"
    )
