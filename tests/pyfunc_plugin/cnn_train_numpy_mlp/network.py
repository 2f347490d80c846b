"""The network's forward pass: float32 NHWC images in, class probabilities out. NumPy only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = Mapping[str, np.ndarray]


def hidden_and_logits(weights: Weights, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ReLU layer's activations and the logits, for images flattened as the lesson's Flatten does."""
    flat = images.reshape(len(images), -1)
    hidden = np.maximum(flat @ weights["hidden_kernel"] + weights["hidden_bias"], 0.0)
    return hidden, hidden @ weights["logits_kernel"] + weights["logits_bias"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def probabilities(weights: Weights, images: np.ndarray) -> np.ndarray:
    """Class probabilities ``(n, classes)``, float32."""
    return softmax(hidden_and_logits(weights, images)[1]).astype(np.float32, copy=False)
