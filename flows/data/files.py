"""The four official Fashion-MNIST files: their names, IDX layout and content checksums.

Files are verified by the SHA-256 of their *decompressed* content. The official ``.gz`` files
(MD5s in the zalandoresearch/fashion-mnist README: train-images 8d4fb7e6c68d591d4c3dfef9ec88bf0d,
train-labels 25c81989df183df01b3e8a0aad5dffbe, t10k-images bef4ecab320f06d8554ea6380940ec79,
t10k-labels bb300cfdad3c16e7a12a480ee83cd310) are not byte-identical to every faithful copy:
Debian's ``dataset-fashion-mnist`` ran them through strip-nondeterminism, which drops the file name
and mtime from the gzip header. Putting those header fields back onto Debian's files reproduces the
four official MD5s exactly, so the content hashes below are those of the official release.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.plugins.config import FASHION_MNIST_CLASSES

IMAGE_SIDE = 28
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
NUM_CLASSES = len(FASHION_MNIST_CLASSES)


class DatasetError(ExpectedFailure):
    """The dataset cannot be found or read; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class IdxFile:
    """One of the four official files and what its decompressed content must be."""

    name: str
    magic: int
    count: int
    sha256: str

    @property
    def is_images(self) -> bool:
        return self.magic == IMAGES_MAGIC

    @property
    def kind(self) -> str:
        return "images" if self.is_images else "labels"

    @property
    def unpacked_name(self) -> str:
        """The name gunzip gives the file, as Kaggle's copy of the dataset holds it."""
        return self.name.removesuffix(".gz")

    def path_in(self, folder: Path) -> Path:
        """The file in ``folder``: the official ``.gz``, else the unpacked file, else where the ``.gz`` would be."""
        packed, unpacked = folder / self.name, folder / self.unpacked_name
        return unpacked if not packed.is_file() and unpacked.is_file() else packed


#: The files in the order a run reads them: name, magic number, item count, SHA-256 of the content.
FILES: tuple[IdxFile, ...] = tuple(
    IdxFile(*row)
    for row in (
        ("train-images-idx3-ubyte.gz", IMAGES_MAGIC, 60_000, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train-labels-idx1-ubyte.gz", LABELS_MAGIC, 60_000, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("t10k-images-idx3-ubyte.gz", IMAGES_MAGIC, 10_000, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("t10k-labels-idx1-ubyte.gz", LABELS_MAGIC, 10_000, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    )
)
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES
FILE_NAMES: tuple[str, ...] = tuple(f.name for f in FILES)
#: Each images file with the labels file that must hold one label per image.
PAIRS: tuple[tuple[IdxFile, IdxFile], ...] = ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))
