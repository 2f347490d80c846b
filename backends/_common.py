"""Small pieces both built-in backends share, so they read, check and shuffle data identically."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from importlib.metadata import version

import numpy as np

from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import check_images, check_labels

#: Images per forward pass when nothing is trained (validation, evaluation, prediction).
INFERENCE_BATCH = 256

NOT_BUILT = "no model yet: call build() (or load()) first"

#: The lessons' two networks; both built-in backends build them (torch also builds the recipe's).
ARCHITECTURES: tuple[str, ...] = ("cnn", "dense")

#: glibc's mallopt parameters (malloc.h), and the values keep_freed_memory sets: 32 MiB is the largest
#: mmap threshold glibc takes; 1 GiB of freed heap top is kept before any goes back to the OS.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30


@functools.cache  # a process-wide setting: once per process, however many models are built
def keep_freed_memory() -> None:
    """Keep the memory of freed tensors in the process (glibc's malloc; elsewhere a no-op).

    With glibc's adaptive defaults, each training step's activations of several MB came straight from
    the OS (mmap, or a heap grown and trimmed again) and paid a page fault per 4 KB on first touch,
    until the first validation pass's larger buffers happened to raise the thresholds. Measured on the
    benchmark machine: the recipe's first epoch took 22 s against 15.5 s for every later one, and
    15.5 s with fixed thresholds; the lesson's epochs about 3% less. Numerics are unchanged. This is
    what preloading tcmalloc or jemalloc would do, kept to two settings of the allocator in place."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def unusable_device(device: str, error: Exception) -> ValueError:
    """The error to raise when the framework cannot place the model on ``device``."""
    return ValueError(f"cannot use device {device!r}: {type(error).__name__}: {error}")


def check_evaluation(x: np.ndarray, y: np.ndarray, config: ModelConfig) -> None:
    """What ``evaluate`` refuses: images that do not fit ``config`` or labels that do not fit them."""
    check_images(x, config)
    check_labels(y, x.shape[0], config.num_classes)


def check_feature_request(config: ModelConfig, x: np.ndarray, layers: Sequence[str]) -> None:
    """What ``feature_maps`` refuses: a layer the model lacks (listing those it has), or unfit images."""
    check_layer_names(config, layers)
    check_images(x, config)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffle of ``epoch``: a function of the run seed and the epoch only, so a run resumed
    after epoch k sees the same batches in epoch k + 1 as a run that never stopped."""
    return (seed * 1_000_003 + epoch) % (2**63)


def check_layer_names(config: ModelConfig, layers: Sequence[str]) -> None:
    """Refuse feature-map names the model does not have, listing the ones it does."""
    valid = [name for name, _ in config.feature_map_shapes()]
    if not valid:
        raise ValueError(
            f"the {config.architecture!r} architecture has no convolution or pooling layers, "
            "so it has no feature maps"
        )
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(valid)}")


def check_has_convolution(config: ModelConfig) -> None:
    """Refuse to hand out convolution kernels of a model that has none."""
    if not config.conv_layers:
        raise ValueError(f"the {config.architecture!r} architecture has no convolution, so no kernels")


def pinned(*distributions: str) -> tuple[str, ...]:
    """``name==version`` for each installed distribution, as MLflow's ``pip_requirements`` wants."""
    return tuple(f"{name}=={version(name)}" for name in distributions)
