"""Fashion-MNIST from its original IDX files: find them, verify them, split them, cache the split.

The recipe is :func:`prepare_data` (``prepare.py``): locate the four ``.gz`` files (``locate.py``:
an explicit folder, Debian's package, the Keras cache, or a verified download), parse and check
them (``idx.py``, against the official files described in ``files.py``), take a stratified and
seeded train/validation split (``split.py``) and keep it on disk so the next run loads in a blink
(``cache.py``, bounded to the most recently used splits). ``verify.py`` checks a folder the way a
run reads it, for ``cnn-train doctor``.
"""

from cnn_train.flows.data.cache import CACHED_SPLITS_ENV, MAX_CACHED_SPLITS, default_cache_dir
# The file table's details (magic numbers, IdxFile) stay in files.py: only idx.py reads them.
from cnn_train.flows.data.files import FILE_NAMES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, DatasetError
from cnn_train.flows.data.locate import (
    DATA_DIR_ENV,
    DEBIAN_DIR,
    DOWNLOAD_TIMEOUT_SECONDS,
    DOWNLOAD_URLS,
    HOW_TO_GET,
    default_search_paths,
    download_dir,
    download_fashion_mnist,
    keras_cache_dir,
    locate_fashion_mnist,
)
from cnn_train.flows.data.prepare import PreparedData, prepare_data
from cnn_train.flows.data.split import MIN_SAMPLE_LIMIT, SplitError, SplitPlan, check_split, split_sizes
from cnn_train.flows.data.verify import verify_dataset

__all__ = [
    "CACHED_SPLITS_ENV",
    "DATA_DIR_ENV",
    "DEBIAN_DIR",
    "DOWNLOAD_TIMEOUT_SECONDS",
    "DOWNLOAD_URLS",
    "FILE_NAMES",
    "HOW_TO_GET",
    "MAX_CACHED_SPLITS",
    "MIN_SAMPLE_LIMIT",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "DatasetError",
    "PreparedData",
    "SplitError",
    "SplitPlan",
    "check_split",
    "default_cache_dir",
    "default_search_paths",
    "download_dir",
    "download_fashion_mnist",
    "keras_cache_dir",
    "locate_fashion_mnist",
    "prepare_data",
    "split_sizes",
    "verify_dataset",
]
