"""The on-disk cache of prepared splits, bounded to the few most recently used.

``<digest>.npz`` holds one split as uint8 images (a quarter of float32's size; scaling on load is
cheap). ``files-<fingerprint>.json`` remembers the verified content hashes of the four files by
their stat, so a cached run neither decompresses nor hashes 30 MB of gzip. The cache only ever
speeds a run up: a damaged or unwritable cache is logged and worked around, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn_train.flows.data.atomic import write_atomically
from cnn_train.flows.data.files import FILE_NAMES, FILES, IMAGE_SIDE
from cnn_train.flows.data.split import SplitPlan
from cnn_train.flows.settings import env_number, state_dir

log = logging.getLogger(__name__)

#: Splits kept on disk; the full dataset's split is about 55 MB, so a handful covers the usual
#: variants (full runs and a quick sample_limit) without the folder growing with every sweep.
MAX_CACHED_SPLITS = 4
CACHED_SPLITS_ENV = "CNN_TRAIN_CACHED_SPLITS"


def default_cache_dir() -> Path:
    """The state dir's ``cache/fashion-mnist``."""
    return state_dir() / "cache" / "fashion-mnist"


def cached_splits_limit() -> int:
    """How many splits the cache keeps: ``$CNN_TRAIN_CACHED_SPLITS``, else :data:`MAX_CACHED_SPLITS`."""
    return int(env_number(CACHED_SPLITS_ENV, MAX_CACHED_SPLITS, minimum=1, whole=True))


# --- which files a folder holds ------------------------------------------------------------------


@dataclass(frozen=True)
class FilesMemo:
    """What parsing a folder found: each file's content SHA-256 and the (train, test) image counts."""

    sha256: dict[str, str]
    counts: tuple[int, int]


def memo_path(cache_dir: Path, folder: Path) -> Path:
    """The memo of ``folder``'s files as they are now: any change to their stat gives another path."""
    stats = []
    for spec in FILES:
        path = spec.path_in(folder).resolve()
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return cache_dir / f"files-{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]}.json"


def read_memo(path: Path) -> FilesMemo | None:
    try:
        memo = json.loads(path.read_text())
        sha256 = {name: str(memo["sha256"][name]) for name in FILE_NAMES}
        return FilesMemo(sha256, (int(memo["counts"][0]), int(memo["counts"][1])))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        log.warning("ignoring unreadable dataset memo %s (%s); files will be re-verified", path, error)
        return None


def save_memo(path: Path, memo: FilesMemo) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"sha256": memo.sha256, "counts": memo.counts}).encode()
        write_atomically(path, lambda file: file.write(blob))
    except OSError as error:
        log.warning("could not write the dataset memo %s (%s)", path, error)


# --- the splits ----------------------------------------------------------------------------------


def split_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / f"{digest}.npz"


def _mark_used(path: Path) -> None:
    # Recency is the mtime, set on every hit: atime is not updated on noatime mounts and only
    # daily on relatime ones, so it cannot order the splits by use.
    try:
        os.utime(path)
    except OSError as error:
        log.debug("could not mark %s as used (%s); it may be pruned earlier", path, error)


def load_split(path: Path, plan: SplitPlan) -> dict[str, np.ndarray] | None:
    """The cached split, or None when it is missing or does not hold exactly what ``plan`` asks for."""
    if not path.is_file():
        return None
    expected = {"train": plan.train_size, "val": plan.validation_size, "test": plan.test_size}
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}  # reading checks each member's CRC
        for split, n in expected.items():
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            expected_layout = (np.uint8, (n, IMAGE_SIDE, IMAGE_SIDE), np.int64, (n,))
            if (x.dtype, x.shape, y.dtype, y.shape) != expected_layout:
                raise ValueError(f"{split} split has shape {x.shape}/{y.shape}, expected {n} images")
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        log.warning("rebuilding the damaged data cache %s (%s)", path, error)
        path.unlink(missing_ok=True)
        return None
    _mark_used(path)
    return arrays


def prune_splits(cache_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently used splits; the deleted paths, oldest last."""
    used_at = {}
    for path in cache_dir.glob("*.npz"):
        try:
            used_at[path] = path.stat().st_mtime_ns
        except FileNotFoundError:  # another run pruned it meanwhile
            continue
    stale = sorted(used_at, key=used_at.__getitem__, reverse=True)[keep:]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_split(path: Path, arrays: dict[str, np.ndarray], *, keep: int) -> None:
    """Cache ``arrays`` at ``path``, then prune the folder to the ``keep`` most recently used splits."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: np.savez(file, **arrays))
        if pruned := prune_splits(path.parent, keep):
            log.info("pruned %d least recently used data split(s) from %s", len(pruned), path.parent)
    except OSError as error:
        log.warning("could not write the data cache %s (%s); the next run will parse again", path, error)
