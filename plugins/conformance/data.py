"""The kit's test data: small learnable images and a one-epoch training config, so every check runs in seconds."""

from __future__ import annotations

import numpy as np

from cnn_train.plugins.config import TrainConfig
from cnn_train.plugins.contract import TrainData

#: One epoch of small batches: enough to see the loss move, short enough for a CPU.
SMOKE = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, seed=7)


def images(n: int = 64, *, seed: int = 0, shape: tuple[int, int, int] = (28, 28, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Float32 images in [0, 1] with int64 labels; each class lights a different horizontal band."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    x = rng.uniform(0.0, 0.3, size=(n, *shape)).astype(np.float32)
    band = shape[0] // 10
    for i, label in enumerate(labels):
        x[i, label * band : (label + 1) * band] += 0.7
    return x, labels


def train_data(n: int = 64) -> TrainData:
    """``n`` training images and 32 validation images, drawn with different seeds."""
    x, y = images(n, seed=1)
    x_val, y_val = images(32, seed=2)
    return TrainData(x, y, x_val, y_val)
