"""Fashion-MNIST from its original IDX files: find them, verify them, split them, cache the split.

The recipe is ``prepare_data()``: locate the four ``.gz`` files (an explicit folder, Debian's
package, the Keras cache, or a verified download), parse them with NumPy, take a stratified and
seeded train/validation split, and keep the result on disk so the next run loads in a blink.

Files are verified by the SHA-256 of their *decompressed* content. The official ``.gz`` files
(MD5s in the zalandoresearch/fashion-mnist README: train-images 8d4fb7e6c68d591d4c3dfef9ec88bf0d,
train-labels 25c81989df183df01b3e8a0aad5dffbe, t10k-images bef4ecab320f06d8554ea6380940ec79,
t10k-labels bb300cfdad3c16e7a12a480ee83cd310) are not byte-identical to every faithful copy:
Debian's ``dataset-fashion-mnist`` ran them through strip-nondeterminism, which drops the file name
and mtime from the gzip header. Putting those header fields back onto Debian's files reproduces the
four official MD5s exactly, so the content hashes below are those of the official release.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib
import json
import logging
import math
import os
import tempfile
import threading
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cnn_train.flows.settings import state_dir
from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from cnn_train.plugins.contract import TrainData

log = logging.getLogger(__name__)

IMAGE_SIDE = 28
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
DATA_DIR_ENV = "CNN_TRAIN_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where Keras (and then the zalando repository) serve the official files, in the order tried.
DOWNLOAD_URLS: tuple[str, ...] = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
DOWNLOAD_TIMEOUT_SECONDS = 15.0
#: Smallest ``sample_limit``: two images per class, so both splits can hold every class.
MIN_SAMPLE_LIMIT = 20
#: Bumped whenever the way a split is drawn changes, so old caches and digests are not reused.
SPLIT_VERSION = 1
HOW_TO_GET = (
    f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    f"pass data_dir / set {DATA_DIR_ENV} to a folder holding the four files, or allow the download"
)


class DatasetError(Exception):
    """The dataset cannot be found or read; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class IdxFile:
    """One of the four official files and what its decompressed content must be."""

    name: str
    magic: int
    count: int
    sha256: str


TRAIN_IMAGES = IdxFile(
    "train-images-idx3-ubyte.gz", IMAGES_MAGIC, 60_000,
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
)
TRAIN_LABELS = IdxFile(
    "train-labels-idx1-ubyte.gz", LABELS_MAGIC, 60_000,
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
)
TEST_IMAGES = IdxFile(
    "t10k-images-idx3-ubyte.gz", IMAGES_MAGIC, 10_000,
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
)
TEST_LABELS = IdxFile(
    "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC, 10_000,
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
)
FILES: tuple[IdxFile, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
FILE_NAMES: tuple[str, ...] = tuple(f.name for f in FILES)
# Records which mirror filled our download folder, so runs on those files report the URL.
_SOURCE_MARKER = ".source-url"


# --- finding the files ---------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """Where Keras's ``fashion_mnist.load_data()`` keeps its files (``$KERAS_HOME`` or ``~/.keras``)."""
    home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(home) / "datasets" / "fashion-mnist"


def download_dir() -> Path:
    """Where a download lands: the state dir's ``data/fashion-mnist``."""
    return state_dir() / "data" / "fashion-mnist"


def default_search_paths() -> list[Path]:
    """Folders tried, in order, when neither ``data_dir`` nor ``$CNN_TRAIN_DATA_DIR`` is given."""
    return [DEBIAN_DIR, keras_cache_dir(), download_dir()]


def _missing_files(folder: Path) -> list[str]:
    return [name for name in FILE_NAMES if not (folder / name).is_file()]


def _explicit_dir(data_dir: Path | str | None) -> tuple[Path, str] | None:
    """The folder the user named (argument first, then the environment) and how they named it."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir"
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser(), f"${DATA_DIR_ENV}"
    return None


def locate_fashion_mnist(
    data_dir: Path | str | None = None,
    *,
    allow_download: bool = True,
    search_paths: Sequence[Path | str] | None = None,
) -> Path:
    """The first folder holding all four files: ``data_dir``, ``$CNN_TRAIN_DATA_DIR``, then
    ``search_paths`` (default :func:`default_search_paths`), else a verified download.

    A folder the user named that lacks files is an error naming them, never a silent fall-through.
    """
    if explicit := _explicit_dir(data_dir):
        folder, named_by = explicit
        if missing := _missing_files(folder):
            raise DatasetError(
                f"{named_by} {folder} does not hold {', '.join(missing)}; it must contain all four "
                f"Fashion-MNIST files ({', '.join(FILE_NAMES)}). Point it at a folder that does, or "
                f"unset it to search the usual places ({DEBIAN_DIR}, the Keras cache, a download)"
            )
        return folder

    candidates = default_search_paths() if search_paths is None else [Path(p) for p in search_paths]
    looked_at = []
    for folder in candidates:
        missing = _missing_files(folder)
        if not missing:
            return folder
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        looked_at.append(f"  - {folder} ({what})")

    if allow_download:
        try:
            return download_fashion_mnist(download_dir())
        except DatasetError as error:
            looked_at.append(f"  - download failed: {error}")
    else:
        looked_at.append("  - download not allowed (allow_download=False)")
    raise DatasetError(
        "Fashion-MNIST not found. Looked for the four files "
        f"({', '.join(FILE_NAMES)}) in:\n" + "\n".join(looked_at) + f"\nTo fix: {HOW_TO_GET}."
    )


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_fashion_mnist(
    target: Path, *, urls: Sequence[str] = DOWNLOAD_URLS, timeout: float = DOWNLOAD_TIMEOUT_SECONDS
) -> Path:
    """Fetch the four files into ``target``, trying each base URL in turn; only verified files are kept."""
    target.mkdir(parents=True, exist_ok=True)
    used = []
    for spec in FILES:
        failures = []
        for base in urls:
            url = base + spec.name
            try:
                blob = _fetch(url, timeout)
                _check_content(
                    _decompress(blob, url), spec, url, verify_checksum=True,
                    mismatch_fix="This server does not send the official file.",
                )
            except DatasetError as error:
                failures.append(str(error))
                continue
            except (OSError, http.client.HTTPException) as error:
                failures.append(f"{url}: {error}")
                continue
            _write_atomically(target / spec.name, lambda file: file.write(blob))
            used.append(base)
            break
        else:
            raise DatasetError(f"could not download {spec.name}: " + "; ".join(failures))
    _write_atomically(target / _SOURCE_MARKER, lambda file: file.write(used[0].encode()))
    log.info("downloaded Fashion-MNIST from %s into %s", used[0], target)
    return target


def _source_of(folder: Path) -> str:
    marker = folder / _SOURCE_MARKER
    return marker.read_text().strip() if marker.is_file() else str(folder.resolve())


# --- parsing and verifying -----------------------------------------------------------------------


def _decompress(blob: bytes, where: Path | str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(
            f"{where}: not a complete gzip file ({error}); it is truncated or damaged. "
            "Replace it with an intact copy of the official file"
        ) from None


_LOCAL_MISMATCH_FIX = (
    "The file is damaged or not the official one: replace it with an intact copy, or pass "
    "verify_checksums=False with an explicit data_dir to use a modified dataset on purpose."
)


def _check_content(
    content: bytes,
    spec: IdxFile,
    where: Path | str,
    *,
    verify_checksum: bool,
    mismatch_fix: str = _LOCAL_MISMATCH_FIX,
) -> np.ndarray:
    """The IDX payload of ``content``: uint8 ``(n, 28, 28)`` images or ``(n,)`` labels; else DatasetError."""
    is_images = spec.magic == IMAGES_MAGIC
    header_size = 16 if is_images else 8
    kind = "images" if is_images else "labels"
    if len(content) < header_size:
        raise DatasetError(
            f"{where}: truncated IDX header ({len(content)} bytes, an IDX {kind} file starts with "
            f"{header_size}). Replace it with an intact copy of the official file"
        )
    header = np.frombuffer(content, dtype=">u4", count=header_size // 4)
    magic, count = int(header[0]), int(header[1])
    if magic != spec.magic:
        raise DatasetError(
            f"{where}: wrong IDX magic number {magic}; {spec.name} must start with {spec.magic} "
            f"({kind}). Check that the files are not swapped or renamed"
        )
    if is_images and (int(header[2]), int(header[3])) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{where}: images are {int(header[2])}x{int(header[3])}, Fashion-MNIST images must be "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    item_size = IMAGE_SIDE * IMAGE_SIDE if is_images else 1
    expected_bytes = header_size + count * item_size
    if len(content) != expected_bytes:
        problem = "truncated payload" if len(content) < expected_bytes else "unexpected trailing bytes"
        raise DatasetError(
            f"{where}: {problem}: the header announces {count} {kind} ({expected_bytes} bytes), "
            f"the file holds {len(content)} bytes. Replace it with an intact copy of the official file"
        )
    if verify_checksum:
        got = hashlib.sha256(content).hexdigest()
        if got != spec.sha256:
            counts = ""
            if count != spec.count:
                counts = f" It holds {count} {kind}, the official file {spec.count}."
            raise DatasetError(
                f"{where}: checksum mismatch: expected SHA-256 {spec.sha256} of the decompressed "
                f"official {spec.name}, got {got}.{counts} {mismatch_fix}"
            )
    payload = np.frombuffer(content, dtype=np.uint8, offset=header_size)
    if is_images:
        return payload.reshape(count, IMAGE_SIDE, IMAGE_SIDE)
    if count and int(payload.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(
            f"{where}: label {int(payload.max())} is out of range; labels must lie in "
            f"[0, {len(FASHION_MNIST_CLASSES) - 1}]"
        )
    return payload


@dataclass(frozen=True, eq=False)
class _RawData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    #: SHA-256 of each file's decompressed content, by file name.
    sha256: dict[str, str]


def _parse_folder(folder: Path, *, verify_checksums: bool) -> _RawData:
    arrays = {}
    digests = {}
    for spec in FILES:
        path = folder / spec.name
        try:
            blob = path.read_bytes()
        except OSError as error:
            raise DatasetError(f"{path}: cannot be read ({error.strerror or error})") from None
        content = _decompress(blob, path)
        arrays[spec.name] = _check_content(content, spec, path, verify_checksum=verify_checksums)
        digests[spec.name] = spec.sha256 if verify_checksums else hashlib.sha256(content).hexdigest()
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        n_images, n_labels = len(arrays[images.name]), len(arrays[labels.name])
        if n_images != n_labels:
            raise DatasetError(
                f"{folder}: {images.name} holds {n_images} images but {labels.name} holds "
                f"{n_labels} labels; each image needs exactly one label. The two files come from "
                "different datasets or one is damaged"
            )
    return _RawData(
        x_train=arrays[TRAIN_IMAGES.name],
        y_train=arrays[TRAIN_LABELS.name].astype(np.int64),
        x_test=arrays[TEST_IMAGES.name],
        y_test=arrays[TEST_LABELS.name].astype(np.int64),
        sha256=digests,
    )


def load_raw(
    folder: Path | str, *, verify_checksums: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from the four files in ``folder``.

    Images are read-only uint8 ``(n, 28, 28)`` views of the decompressed files; labels are int64.
    """
    raw = _parse_folder(Path(folder), verify_checksums=verify_checksums)
    return raw.x_train, raw.y_train, raw.x_test, raw.y_test


# --- the prepared splits -------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _SplitPlan:
    """The effective split parameters: what the digest and the cache are keyed on."""

    validation_fraction: float
    seed: int
    train_pool: int
    test_size: int

    @property
    def train_size(self) -> int:
        return split_sizes(self.train_pool, self.validation_fraction)[0]

    @property
    def validation_size(self) -> int:
        return split_sizes(self.train_pool, self.validation_fraction)[1]


def split_sizes(train_pool: int, validation_fraction: float) -> tuple[int, int]:
    """``(training, validation)`` images a split of ``train_pool`` images yields.

    The validation share rounds up, as ``train_test_split`` does for a fractional test size.
    """
    validation = math.ceil(validation_fraction * train_pool)
    return train_pool - validation, validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _min_sample_limit(validation_fraction: float, num_classes: int, ceiling: int) -> int | None:
    for n in range(max(MIN_SAMPLE_LIMIT, 2 * num_classes), ceiling + 1):
        if min(split_sizes(n, validation_fraction)) >= num_classes:
            return n
    return None


def _check_arguments(
    validation_fraction: float, seed: int, sample_limit: int | None, test_limit: int | None
) -> None:
    num_classes = len(FASHION_MNIST_CLASSES)
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, int | float):
        raise ValueError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(
            f"validation_fraction must lie strictly between 0 and 1 (e.g. 0.1), got {validation_fraction}"
        )
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if sample_limit is not None:
        if not _is_int(sample_limit) or not MIN_SAMPLE_LIMIT <= sample_limit <= TRAIN_IMAGES.count:
            raise ValueError(
                f"sample_limit must be None (all {TRAIN_IMAGES.count} training images) or an integer "
                f"in [{MIN_SAMPLE_LIMIT}, {TRAIN_IMAGES.count}], got {sample_limit!r}"
            )
    if test_limit is not None:
        if not _is_int(test_limit) or not num_classes <= test_limit <= TEST_IMAGES.count:
            raise ValueError(
                f"test_limit must be None (all {TEST_IMAGES.count} test images) or an integer in "
                f"[{num_classes}, {TEST_IMAGES.count}] (one image per class at least), got {test_limit!r}"
            )


def _plan(
    validation_fraction: float,
    seed: int,
    sample_limit: int | None,
    test_limit: int | None,
    available: tuple[int, int],
    folder: Path,
) -> _SplitPlan:
    """Check the limits against the images really available and fix the split sizes."""
    n_train, n_test = available
    num_classes = len(FASHION_MNIST_CLASSES)
    for name, limit, n in (("sample_limit", sample_limit, n_train), ("test_limit", test_limit, n_test)):
        if limit is not None and limit > n:
            raise ValueError(
                f"{name}={limit} exceeds the {n} images available in {folder}; use at most {n}"
            )
    plan = _SplitPlan(
        validation_fraction=float(validation_fraction),
        seed=int(seed),
        train_pool=n_train if sample_limit is None else int(sample_limit),
        test_size=n_test if test_limit is None else int(test_limit),
    )
    if plan.validation_size < num_classes or plan.train_size < num_classes:
        smallest = _min_sample_limit(plan.validation_fraction, num_classes, n_train)
        hint = (
            f"use sample_limit >= {smallest} or change validation_fraction"
            if smallest
            else "change validation_fraction"
        )
        raise ValueError(
            f"splitting {plan.train_pool} images with validation_fraction={validation_fraction} gives "
            f"{plan.train_size} training and {plan.validation_size} validation images; a stratified "
            f"split needs at least {num_classes} in each (one per class): {hint}"
        )
    return plan


def _digest(sha256: dict[str, str], plan: _SplitPlan) -> str:
    key = {
        "files": [sha256[name] for name in FILE_NAMES],
        "validation_fraction": plan.validation_fraction,
        "seed": plan.seed,
        "train_pool": plan.train_pool,
        "test_size": plan.test_size,
        "split_version": SPLIT_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``size`` items, each class keeping its share (largest remainders round up)."""
    if size >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    # Exact integer shares: floor of counts * size / total, then one more for the largest remainders.
    take, remainders = np.divmod(counts * size, len(labels))
    take[np.argsort(-remainders, kind="stable")[: size - int(take.sum())]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` on another thread and return it, to be joined before use."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    return thread


def _split(raw: _RawData, plan: _SplitPlan) -> dict[str, np.ndarray]:
    """uint8 images and int64 labels of the three splits."""
    from sklearn.model_selection import train_test_split

    pool = _stratified_subset(raw.y_train, plan.train_pool, np.random.default_rng([plan.seed, 0]))
    train_idx, val_idx = train_test_split(
        pool,
        test_size=plan.validation_fraction,
        stratify=raw.y_train[pool],
        random_state=plan.seed,
    )
    test_idx = _stratified_subset(raw.y_test, plan.test_size, np.random.default_rng([plan.seed, 1]))
    return {
        "x_train": raw.x_train[train_idx],
        "y_train": raw.y_train[train_idx],
        "x_val": raw.x_train[val_idx],
        "y_val": raw.y_train[val_idx],
        "x_test": raw.x_test[test_idx],
        "y_test": raw.y_test[test_idx],
    }


def _scale(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 28, 28)`` to float32 ``(n, 28, 28, 1)`` in [0, 1], exactly ``x / 255``."""
    scaled = np.empty((*images.shape, 1), dtype=np.float32)
    np.divide(images[..., np.newaxis], np.float32(255), out=scaled, casting="unsafe")
    return scaled


# --- the on-disk cache ---------------------------------------------------------------------------
#
# ``<digest>.npz`` holds one split as uint8 images (a quarter of float32's size; scaling on load is
# cheap). ``files-<fingerprint>.json`` remembers the verified content hashes of the four files by
# their stat, so a cached run neither decompresses nor hashes 30 MB of gzip.


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file beside ``path`` and rename it into place: readers, including
    concurrent runs, see the old file or the whole new one, never half of it."""
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with tmp:
            write(tmp)
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def _fingerprint(folder: Path) -> str:
    stats = []
    for name in FILE_NAMES:
        path = (folder / name).resolve()
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _read_memo(path: Path) -> tuple[dict[str, str], tuple[int, int]] | None:
    try:
        memo = json.loads(path.read_text())
        sha256 = {name: str(memo["sha256"][name]) for name in FILE_NAMES}
        return sha256, (int(memo["counts"][0]), int(memo["counts"][1]))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        log.warning("ignoring unreadable dataset memo %s (%s); files will be re-verified", path, error)
        return None


def _load_cached(path: Path, plan: _SplitPlan) -> dict[str, np.ndarray] | None:
    """The cached split, or None when it is missing or does not hold exactly what ``plan`` asks for."""
    if not path.is_file():
        return None
    expected = {
        "train": plan.train_size,
        "val": plan.validation_size,
        "test": plan.test_size,
    }
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}  # reading checks each member's CRC
        for split, n in expected.items():
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            expected_layout = (np.uint8, (n, IMAGE_SIDE, IMAGE_SIDE), np.int64, (n,))
            if (x.dtype, x.shape, y.dtype, y.shape) != expected_layout:
                raise ValueError(f"{split} split has shape {x.shape}/{y.shape}, expected {n} images")
        return arrays
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        log.warning("rebuilding the damaged data cache %s (%s)", path, error)
        path.unlink(missing_ok=True)
        return None


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda file: np.savez(file, **arrays))
    except OSError as error:
        log.warning("could not write the data cache %s (%s); the next run will parse again", path, error)


def _save_memo(path: Path, sha256: dict[str, str], counts: tuple[int, int]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        memo = json.dumps({"sha256": sha256, "counts": counts}).encode()
        _write_atomically(path, lambda file: file.write(memo))
    except OSError as error:
        log.warning("could not write the dataset memo %s (%s)", path, error)


def default_cache_dir() -> Path:
    return state_dir() / "cache" / "fashion-mnist"


def prepare_data(
    data_dir: Path | str | None = None,
    *,
    validation_fraction: float = 0.1,
    seed: int = 42,
    sample_limit: int | None = None,
    test_limit: int | None = None,
    cache_dir: Path | str | None = None,
    allow_download: bool = True,
    verify_checksums: bool = True,
    search_paths: Sequence[Path | str] | None = None,
) -> PreparedData:
    """Fashion-MNIST split into train, validation and test, from the cache when it can be.

    ``sample_limit`` caps the training + validation images drawn from the 60,000 training images and
    ``test_limit`` the test images (both stratified and seeded); the test set is whole by default.
    ``verify_checksums=False`` is only accepted with an explicit ``data_dir`` (or ``$CNN_TRAIN_DATA_DIR``).
    """
    _check_arguments(validation_fraction, seed, sample_limit, test_limit)
    if not verify_checksums and _explicit_dir(data_dir) is None:
        raise ValueError(
            "verify_checksums=False needs an explicit data_dir (or $CNN_TRAIN_DATA_DIR): files found "
            "in the default places are always checked against the official release"
        )
    folder = locate_fashion_mnist(data_dir, allow_download=allow_download, search_paths=search_paths)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo_path = cache / f"files-{_fingerprint(folder)}.json"

    arrays = None
    if (memo := _read_memo(memo_path)) is not None:
        sha256, counts = memo
        if not verify_checksums or all(sha256[f.name] == f.sha256 for f in FILES):
            plan = _plan(validation_fraction, seed, sample_limit, test_limit, counts, folder)
            digest = _digest(sha256, plan)
            arrays = _load_cached(cache / f"{digest}.npz", plan)
    if arrays is None:
        # scikit-learn takes about a second to import, and only a cache miss needs it. zlib and
        # hashlib release the GIL, so importing it meanwhile hides most of that behind the parse.
        sklearn_import = _import_in_background("sklearn.model_selection")
        raw = _parse_folder(folder, verify_checksums=verify_checksums)
        counts = (len(raw.y_train), len(raw.y_test))
        _save_memo(memo_path, raw.sha256, counts)
        plan = _plan(validation_fraction, seed, sample_limit, test_limit, counts, folder)
        digest = _digest(raw.sha256, plan)
        sklearn_import.join()
        arrays = _split(raw, plan)
        _save_cache(cache / f"{digest}.npz", arrays)

    return PreparedData(
        x_train=_scale(arrays["x_train"]),
        y_train=arrays["y_train"],
        x_val=_scale(arrays["x_val"]),
        y_val=arrays["y_val"],
        x_test=_scale(arrays["x_test"]),
        y_test=arrays["y_test"],
        source=_source_of(folder),
        digest=digest,
    )
