"""The recipe: locate the files, check them, split them, scale the images; from the cache when it can be."""

from __future__ import annotations

import functools
import hashlib
import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cnn_train.flows.data.cache import (
    FilesMemo,
    cached_splits_limit,
    default_cache_dir,
    load_split,
    memo_path,
    read_memo,
    save_memo,
    save_split,
    split_path,
)
from cnn_train.flows.data.files import FILES, NUM_CLASSES
from cnn_train.flows.data.idx import read_folder
from cnn_train.flows.data.locate import explicit_dir, locate_fashion_mnist, source_of
from cnn_train.flows.data.split import check_split, split_arrays, split_digest
from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from cnn_train.plugins.contract import TrainData


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Train, validation and test splits ready for a backend.

    Images are float32 ``(n, 28, 28, 1)`` in [0, 1]; labels are int64. ``source`` is the folder
    (or URL) the files came from; ``digest`` identifies the file contents and the split parameters.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    digest: str
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES

    def summary(self) -> dict[str, int]:
        """Images per split."""
        return {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}

    def train_data(self) -> TrainData:
        """The training and validation arrays as a backend's ``train`` takes them."""
        return TrainData(self.x_train, self.y_train, self.x_val, self.y_val)

    @functools.cached_property
    def test_digest(self) -> str:
        """What identifies the test set models are scored on: its images and labels, whatever the training
        split (two runs with different sample limits share a test set, and their scores compare)."""
        digest = hashlib.sha256()
        digest.update(self.x_test.tobytes())
        digest.update(self.y_test.tobytes())
        return digest.hexdigest()[:16]


def _scale(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 28, 28)`` to float32 ``(n, 28, 28, 1)`` in [0, 1], exactly ``x / 255``."""
    scaled = np.empty((*images.shape, 1), dtype=np.float32)
    np.divide(images[..., np.newaxis], np.float32(255), out=scaled, casting="unsafe")
    return scaled


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` on another thread and return it, to be joined before use."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    return thread


def prepare_data(
    data_dir: Path | str | None = None,
    *,
    validation_fraction: float,
    seed: int,
    sample_limit: int | None = None,
    test_limit: int | None = None,
    cache_dir: Path | str | None = None,
    allow_download: bool = True,
    verify_checksums: bool = True,
    search_paths: Sequence[Path | str] | None = None,
) -> PreparedData:
    """Fashion-MNIST split into train, validation and test, from the cache when it can be.

    The split's values have no defaults here: a run's come from its declared parameters (flows/params.py).

    ``sample_limit`` caps the training + validation images drawn from the 60,000 training images and
    ``test_limit`` the test images (both stratified; the training images seeded by ``seed``, the test images
    the same for every seed); the test set is whole by default.
    ``verify_checksums=False`` is only accepted with an explicit ``data_dir`` (or ``$CNN_TRAIN_DATA_DIR``).
    """
    plan_split = partial(check_split, sample_limit, validation_fraction, NUM_CLASSES, seed=seed, test_limit=test_limit)
    # Checked against the official counts first, so bad arguments fail before any file is read, and
    # again against what the files hold once that is known.
    plan_split()
    if not verify_checksums and explicit_dir(data_dir) is None:
        raise ValueError(
            "verify_checksums=False needs an explicit data_dir (or $CNN_TRAIN_DATA_DIR): files found "
            "in the default places are always checked against the official release"
        )
    folder = locate_fashion_mnist(data_dir, allow_download=allow_download, search_paths=search_paths)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo_file = memo_path(cache, folder)

    arrays = None
    memo = read_memo(memo_file)
    if memo is not None and (not verify_checksums or all(memo.sha256[f.name] == f.sha256 for f in FILES)):
        plan = plan_split(train_images=memo.counts[0], test_images=memo.counts[1])
        digest = split_digest(memo.sha256, plan)
        arrays = load_split(split_path(cache, digest), plan)
    if arrays is None:
        # scikit-learn takes about a second to import, and only a cache miss needs it. zlib and
        # hashlib release the GIL, so importing it meanwhile hides most of that behind the parse.
        sklearn_import = _import_in_background("sklearn.model_selection")
        raw = read_folder(folder, verify_checksums=verify_checksums)
        counts = (len(raw.y_train), len(raw.y_test))
        save_memo(memo_file, FilesMemo(raw.sha256, counts))
        plan = plan_split(train_images=counts[0], test_images=counts[1])
        digest = split_digest(raw.sha256, plan)
        sklearn_import.join()
        arrays = split_arrays(raw, plan)
        save_split(split_path(cache, digest), arrays, keep=cached_splits_limit())

    return PreparedData(
        x_train=_scale(arrays["x_train"]),
        y_train=arrays["y_train"],
        x_val=_scale(arrays["x_val"]),
        y_val=arrays["y_val"],
        x_test=_scale(arrays["x_test"]),
        y_test=arrays["y_test"],
        source=source_of(folder),
        digest=digest,
    )
