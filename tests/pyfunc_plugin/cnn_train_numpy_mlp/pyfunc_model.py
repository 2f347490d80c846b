"""What MLflow loads: the weights file and a NumPy forward pass, as an ``mlflow.pyfunc.PythonModel``.

It imports numpy and mlflow only (no cnn-train), so the logged model loads anywhere they are installed.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

from cnn_train_numpy_mlp.network import probabilities


class NumpyMLPModel(mlflow.pyfunc.PythonModel):
    """Float32 images ``(n, 28, 28, 1)`` in, class probabilities ``(n, 10)`` out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # MLflow copied the file named "weights" in LoggableModel.artifacts into the model.
        with np.load(context.artifacts["weights"]) as saved:
            self._weights = {name: saved[name] for name in saved.files}

    # MLflow reads the input's type hint: np.ndarray means "a NumPy array, no schema inferred from
    # the hint" (the signature the flow logs, float32 tensors, describes it instead).
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return probabilities(self._weights, np.asarray(model_input, dtype=np.float32))
