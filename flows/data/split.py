"""The split: check its arguments, fix its sizes, draw it (stratified and seeded), name it by a digest."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnn_train.flows.data.files import FILE_NAMES, NUM_CLASSES, TEST_IMAGES, TRAIN_IMAGES
from cnn_train.flows.data.idx import RawData
from cnn_train.flows.errors import ExpectedFailure

#: Smallest ``sample_limit``: two images per class, so both splits can hold every class.
MIN_SAMPLE_LIMIT = 20
#: Bumped whenever the way a split is drawn changes, so old caches and digests are not reused.
#: 2: the test subset no longer depends on the seed.
SPLIT_VERSION = 2
#: Draws the ``test_limit`` subset: the same test images for every seed, so runs that differ only in
#: their seed are scored on one test set and compare (the registry compares only such runs).
TEST_SUBSET_SEED = (0, 1)


class SplitError(ExpectedFailure, ValueError):
    """The split arguments cannot give a usable split; the message names the cause and what is allowed."""


def split_sizes(train_pool: int, validation_fraction: float) -> tuple[int, int]:
    """``(training, validation)`` images a split of ``train_pool`` images yields.

    The validation share rounds up, as ``train_test_split`` does for a fractional test size.
    """
    validation = math.ceil(validation_fraction * train_pool)
    return train_pool - validation, validation


@dataclass(frozen=True)
class SplitPlan:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _fits(train_pool: int, validation_fraction: float, num_classes: int) -> bool:
    return min(split_sizes(train_pool, validation_fraction)) >= num_classes


def _fraction_range(train_pool: int, num_classes: int) -> tuple[float, float] | None:
    """Fractions that all give both splits ``num_classes`` images, rounded inwards to about one image."""
    if train_pool < 2 * num_classes:
        return None
    first = max(2, math.ceil(math.log10(train_pool)))
    for decimals in range(first, first + 3):
        scale = 10**decimals
        low = math.ceil(num_classes / train_pool * scale) / scale
        high = math.floor((train_pool - num_classes) / train_pool * scale) / scale
        # Both ends are tried for real: a product like 0.07 * 100 can round above the exact value.
        if low <= high and _fits(train_pool, low, num_classes) and _fits(train_pool, high, num_classes):
            return low, high
    return None


def _min_sample_limit(validation_fraction: float, num_classes: int, ceiling: int) -> int | None:
    for n in range(max(MIN_SAMPLE_LIMIT, 2 * num_classes), ceiling + 1):
        if _fits(n, validation_fraction, num_classes):
            return n
    return None


def _too_few_message(
    validation_fraction: float, sample_limit: int | None, train_pool: int, num_classes: int, train_images: int
) -> str:
    train, validation = split_sizes(train_pool, validation_fraction)
    short, got, other, rest = (
        ("training", train, "validation", validation) if train < num_classes
        else ("validation", validation, "training", train)
    )
    pool = f"sample_limit={train_pool}" if sample_limit is not None else f"the {train_pool} training images"
    fixes = []
    if fractions := _fraction_range(train_pool, num_classes):
        low, high = fractions
        between = f"={low:g}" if low == high else f" between {low:g} and {high:g}"
        fixes.append(f"validation_fraction{between}")
    smallest = _min_sample_limit(validation_fraction, num_classes, train_images)
    if smallest is not None and smallest > train_pool:
        fixes.append(f"sample_limit >= {smallest}")
    return (
        f"validation_fraction={validation_fraction} leaves too few {short} images: {got} of {pool} "
        f"({rest} go to {other}), and a stratified split needs at least {num_classes} in each (one per class); "
        + (f"use {' or '.join(fixes)}" if fixes else "use more images")
    )


def check_split(
    sample_limit: int | None,
    validation_fraction: float,
    num_classes: int = NUM_CLASSES,
    *,
    seed: int = 0,
    test_limit: int | None = None,
    train_images: int = TRAIN_IMAGES.count,
    test_images: int = TEST_IMAGES.count,
) -> SplitPlan:
    """The split these arguments give, or SplitError saying which argument is wrong and what is allowed.

    ``train_images`` and ``test_images`` are the images the files hold (the official counts unless
    given), so this can run before any file is read and again once they have been.
    """
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, int | float):
        raise SplitError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
    if not 0 < validation_fraction < 1:
        raise SplitError(
            f"validation_fraction must lie strictly between 0 and 1 (e.g. 0.1), got {validation_fraction}"
        )
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise SplitError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    smallest = max(MIN_SAMPLE_LIMIT, 2 * num_classes)
    if sample_limit is not None and (not _is_int(sample_limit) or not smallest <= sample_limit <= train_images):
        raise SplitError(
            f"sample_limit must be None (all {train_images} training images) or an integer "
            f"in [{smallest}, {train_images}], got {sample_limit!r}"
        )
    if test_limit is not None and (not _is_int(test_limit) or not num_classes <= test_limit <= test_images):
        raise SplitError(
            f"test_limit must be None (all {test_images} test images) or an integer in "
            f"[{num_classes}, {test_images}] (one image per class at least), got {test_limit!r}"
        )
    train_pool = train_images if sample_limit is None else int(sample_limit)
    if not _fits(train_pool, validation_fraction, num_classes):
        raise SplitError(
            _too_few_message(validation_fraction, sample_limit, train_pool, num_classes, train_images)
        )
    return SplitPlan(
        validation_fraction=float(validation_fraction),
        seed=int(seed),
        train_pool=train_pool,
        test_size=test_images if test_limit is None else int(test_limit),
    )


def split_digest(sha256: dict[str, str], plan: SplitPlan) -> str:
    """16 hex digits naming a split: the files' contents, the plan and the way splits are drawn."""
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


def split_arrays(raw: RawData, plan: SplitPlan) -> dict[str, np.ndarray]:
    """uint8 images and int64 labels of the three splits, keyed ``x_train``, ``y_train``, ``x_val``..."""
    from sklearn.model_selection import train_test_split

    pool = _stratified_subset(raw.y_train, plan.train_pool, np.random.default_rng([plan.seed, 0]))
    train_idx, val_idx = train_test_split(
        pool,
        test_size=plan.validation_fraction,
        stratify=raw.y_train[pool],
        random_state=plan.seed,
    )
    test_idx = _stratified_subset(raw.y_test, plan.test_size, np.random.default_rng(TEST_SUBSET_SEED))
    return {
        "x_train": raw.x_train[train_idx],
        "y_train": raw.y_train[train_idx],
        "x_val": raw.x_train[val_idx],
        "y_val": raw.y_train[val_idx],
        "x_test": raw.x_test[test_idx],
        "y_test": raw.y_test[test_idx],
    }
