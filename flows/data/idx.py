"""Parse and check the IDX files: gzip intact, magic number, dimensions, counts, content checksum.

A run (:func:`read_folder`), a download and ``cnn-train doctor`` (``verify.py``) all check a file
through :func:`read_idx` / :func:`parse_idx`, so they refuse the same files with the same words.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn_train.flows.data.files import (
    FILE_NAMES,
    FILES,
    IMAGE_SIDE,
    NUM_CLASSES,
    PAIRS,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetError,
    IdxFile,
)

REPLACE_IT = "Replace it with an intact copy of the official file"
# Runs always check the files (prepare_data's verify_checksums=False, for Python code on a modified copy,
# is no run parameter, so the line does not offer it).
LOCAL_MISMATCH_FIX = "The file is damaged or not the official one: replace it with an intact copy of the official file."


def decompress(blob: bytes, where: Path | str) -> bytes:
    """The content of a gzip file, or DatasetError when it is truncated or not gzip at all."""
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(
            f"{where}: not a complete gzip file ({error}); it is truncated or damaged. {REPLACE_IT}"
        ) from None


def parse_idx(content: bytes, spec: IdxFile, where: Path | str) -> np.ndarray:
    """The IDX payload of ``content``: uint8 ``(n, 28, 28)`` images or ``(n,)`` labels; else DatasetError."""
    header_size = 16 if spec.is_images else 8
    if len(content) < header_size:
        raise DatasetError(
            f"{where}: truncated IDX header ({len(content)} bytes, an IDX {spec.kind} file starts with "
            f"{header_size}). {REPLACE_IT}"
        )
    header = np.frombuffer(content, dtype=">u4", count=header_size // 4)
    magic, count = int(header[0]), int(header[1])
    if magic != spec.magic:
        raise DatasetError(
            f"{where}: wrong IDX magic number {magic}; an IDX file of {spec.kind} starts with {spec.magic}. "
            "Check that the files are not swapped or renamed"
        )
    if spec.is_images and (int(header[2]), int(header[3])) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{where}: images are {int(header[2])}x{int(header[3])}, Fashion-MNIST images must be "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    item_size = IMAGE_SIDE * IMAGE_SIDE if spec.is_images else 1
    expected_bytes = header_size + count * item_size
    if len(content) != expected_bytes:
        problem = "truncated payload" if len(content) < expected_bytes else "unexpected trailing bytes"
        raise DatasetError(
            f"{where}: {problem}: the header announces {count} {spec.kind} ({expected_bytes} bytes), "
            f"the file holds {len(content)} bytes. {REPLACE_IT}"
        )
    payload = np.frombuffer(content, dtype=np.uint8, offset=header_size)
    if spec.is_images:
        return payload.reshape(count, IMAGE_SIDE, IMAGE_SIDE)
    if count and int(payload.max()) >= NUM_CLASSES:
        raise DatasetError(
            f"{where}: label {int(payload.max())} is out of range; labels must lie in [0, {NUM_CLASSES - 1}]"
        )
    return payload


def _check_checksum(sha256: str, count: int, spec: IdxFile, where: Path | str, fix: str) -> None:
    """DatasetError unless ``sha256`` (of the decompressed content) is the official file's."""
    if sha256 == spec.sha256:
        return
    counts = f" It holds {count} {spec.kind}, the official file {spec.count}." if count != spec.count else ""
    raise DatasetError(
        f"{where}: checksum mismatch: expected SHA-256 {spec.sha256} of the decompressed "
        f"official {spec.name}, got {sha256}.{counts} {fix}"
    )


@dataclass(frozen=True, eq=False)
class IdxContent:
    """One parsed file: its items and the SHA-256 of its decompressed content."""

    array: np.ndarray
    sha256: str


def check_content(
    content: bytes, spec: IdxFile, where: Path | str, *, verify_checksum: bool, fix: str = LOCAL_MISMATCH_FIX
) -> IdxContent:
    """Parse decompressed ``content`` and, with ``verify_checksum``, insist on the official file's."""
    array = parse_idx(content, spec, where)
    sha256 = hashlib.sha256(content).hexdigest()
    if verify_checksum:
        _check_checksum(sha256, len(array), spec, where, fix)
    return IdxContent(array, sha256)


def read_idx(path: Path, spec: IdxFile, *, verify_checksum: bool) -> IdxContent:
    """Read, decompress (a ``.gz``; an unpacked file is the content), parse and (optionally) checksum one
    file; any problem is one DatasetError line."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: missing; the folder must hold all four Fashion-MNIST files ({', '.join(FILE_NAMES)})"
        ) from None
    except OSError as error:
        raise DatasetError(
            f"{path}: cannot be read ({error.strerror or error}); make it readable or {REPLACE_IT.lower()}"
        ) from None
    content = decompress(blob, path) if path.suffix == ".gz" else blob
    return check_content(content, spec, path, verify_checksum=verify_checksum)


def count_mismatches(folder: Path, counts: dict[str, int]) -> list[str]:
    """One line per images file whose labels file holds a different number of items."""
    problems = []
    for images, labels in PAIRS:
        n_images, n_labels = counts.get(images.name), counts.get(labels.name)
        if n_images is not None and n_labels is not None and n_images != n_labels:
            problems.append(
                f"{folder}: {images.name} holds {n_images} images but {labels.name} holds "
                f"{n_labels} labels; each image needs exactly one label. The two files come from "
                "different datasets or one is damaged"
            )
    return problems


@dataclass(frozen=True, eq=False)
class RawData:
    """The four files as arrays: read-only uint8 ``(n, 28, 28)`` images, int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    #: SHA-256 of each file's decompressed content, by file name.
    sha256: dict[str, str]


def read_folder(folder: Path, *, verify_checksums: bool) -> RawData:
    """All four files of ``folder``; the first problem found is raised as DatasetError."""
    contents = {spec.name: read_idx(spec.path_in(folder), spec, verify_checksum=verify_checksums) for spec in FILES}
    if problems := count_mismatches(folder, {name: len(c.array) for name, c in contents.items()}):
        raise DatasetError(problems[0])
    return RawData(
        x_train=contents[TRAIN_IMAGES.name].array,
        y_train=contents[TRAIN_LABELS.name].array.astype(np.int64),
        x_test=contents[TEST_IMAGES.name].array,
        y_test=contents[TEST_LABELS.name].array.astype(np.int64),
        sha256={name: content.sha256 for name, content in contents.items()},
    )
