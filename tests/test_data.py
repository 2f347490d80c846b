"""flows/data/: finding, verifying, splitting and caching Fashion-MNIST, on tiny synthetic IDX files
and once on the real files."""

from __future__ import annotations

import gzip
import math
import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from cnn_train.flows import data
from cnn_train.flows.data import (
    DatasetError,
    SplitError,
    check_split,
    locate_fashion_mnist,
    prepare_data,
    verify_dataset,
)
from cnn_train.flows.data.idx import read_folder
from cnn_train.flows.params import DEFAULT_SPLIT
from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from cnn_train.plugins.contract import TrainData
from tests.cases import Cases

SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
TRAIN_IMAGES_FILE = "train-images-idx3-ubyte.gz"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user settings leak in, and anything written to the state dir stays in tmp_path."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.CACHED_SPLITS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))


def prepare(folder: Path, cache_dir: Path, **kwargs) -> data.PreparedData:
    """prepare_data on synthetic files, which cannot match the official checksums."""
    return prepare_data(folder, cache_dir=cache_dir, verify_checksums=False, **(DEFAULT_SPLIT | kwargs))


def assert_same_splits(a: data.PreparedData, b: data.PreparedData) -> None:
    for name in SPLITS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- parsing -------------------------------------------------------------------------------------


def test_read_folder_returns_what_the_files_hold(fake_fashion_mnist):
    raw = read_folder(fake_fashion_mnist.folder, verify_checksums=False)

    np.testing.assert_array_equal(raw.x_train, fake_fashion_mnist.x_train)
    np.testing.assert_array_equal(raw.y_train, fake_fashion_mnist.y_train)
    np.testing.assert_array_equal(raw.x_test, fake_fashion_mnist.x_test)
    np.testing.assert_array_equal(raw.y_test, fake_fashion_mnist.y_test)
    assert (raw.x_train.dtype, raw.x_train.shape) == (np.uint8, (200, 28, 28))
    assert (raw.y_train.dtype, raw.y_test.shape) == (np.int64, (50,))


def _truncate_gzip(path: Path, write_idx_gz) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _not_gzip(path: Path, write_idx_gz) -> None:
    path.write_bytes(b"<html>Not Found</html>")


def _truncate_header(path: Path, write_idx_gz) -> None:
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00"))


def _header_announces_more_images(path: Path, write_idx_gz) -> None:
    write_idx_gz(path, np.zeros((200, 28, 28), np.uint8), count=201)


def _header_announces_fewer_images(path: Path, write_idx_gz) -> None:
    write_idx_gz(path, np.zeros((200, 28, 28), np.uint8), count=199)


def _label_magic_in_image_file(path: Path, write_idx_gz) -> None:
    write_idx_gz(path, np.zeros((200, 28, 28), np.uint8), magic=2049)


def _small_images(path: Path, write_idx_gz) -> None:
    write_idx_gz(path, np.zeros((200, 20, 20), np.uint8))


def _delete(path: Path, write_idx_gz) -> None:
    path.unlink()


BROKEN_TRAIN_IMAGES = [
    pytest.param(_truncate_gzip, r"not a complete gzip file", id="truncated-gzip"),
    pytest.param(_not_gzip, r"not a complete gzip file", id="not-gzip"),
    pytest.param(_truncate_header, r"truncated IDX header \(6 bytes", id="truncated-header"),
    pytest.param(
        _header_announces_more_images,
        r"truncated payload: the header announces 201 images \(157600 bytes\), the file holds 156816 bytes",
        id="truncated-payload",
    ),
    pytest.param(_header_announces_fewer_images, r"unexpected trailing bytes", id="trailing-bytes"),
    pytest.param(
        _label_magic_in_image_file, r"wrong IDX magic number 2049; an IDX file of images starts with 2051\. Check that", id="wrong-magic"
    ),
    pytest.param(
        _small_images, r"images are 20x20, Fashion-MNIST images must be 28x28", id="wrong-image-size"
    ),
    pytest.param(_delete, r"missing; the folder must hold all four Fashion-MNIST files", id="missing-file"),
]


@pytest.mark.parametrize(("damage", "message"), BROKEN_TRAIN_IMAGES)
def test_a_broken_file_is_named_with_what_is_wrong_in_one_line(fake_fashion_mnist, write_idx_gz, damage, message):
    path = fake_fashion_mnist.folder / TRAIN_IMAGES_FILE
    damage(path, write_idx_gz)

    with pytest.raises(DatasetError, match=rf"train-images-idx3-ubyte\.gz: {message}") as raised:
        read_folder(fake_fashion_mnist.folder, verify_checksums=False)
    assert "\n" not in str(raised.value)


def test_labels_out_of_range_are_refused(fake_fashion_mnist, write_idx_gz):
    write_idx_gz(fake_fashion_mnist.folder / "t10k-labels-idx1-ubyte.gz", np.full(50, 12, np.uint8))

    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: label 12 is out of range.*\[0, 9\]"):
        read_folder(fake_fashion_mnist.folder, verify_checksums=False)


def test_image_and_label_counts_must_agree(fake_fashion_mnist, write_idx_gz):
    write_idx_gz(fake_fashion_mnist.folder / "train-labels-idx1-ubyte.gz", np.zeros(190, np.uint8))

    with pytest.raises(
        DatasetError,
        match=r"train-images-idx3-ubyte\.gz holds 200 images but "
        r"train-labels-idx1-ubyte\.gz holds 190 labels",
    ):
        read_folder(fake_fashion_mnist.folder, verify_checksums=False)


def test_checksum_mismatch_says_expected_and_got(fake_fashion_mnist):
    with pytest.raises(DatasetError) as raised:
        read_folder(fake_fashion_mnist.folder, verify_checksums=True)

    message = str(raised.value)
    assert "train-images-idx3-ubyte.gz: checksum mismatch" in message
    assert f"expected SHA-256 {data.TRAIN_IMAGES.sha256}" in message
    assert "It holds 200 images, the official file 60000" in message
    # What a run can do about it: replace the file (verify_checksums is prepare_data's, no run parameter).
    assert message.endswith("replace it with an intact copy of the official file.") and "verify_checksums" not in message
    got = message.split(", got ")[1][:64]
    assert len(got) == 64 and got != data.TRAIN_IMAGES.sha256


def test_skipping_checksums_needs_an_explicit_folder(fake_fashion_mnist, tmp_path):
    with pytest.raises(ValueError, match=r"verify_checksums=False needs an explicit data_dir"):
        prepare_data(verify_checksums=False, search_paths=[fake_fashion_mnist.folder], cache_dir=tmp_path, **DEFAULT_SPLIT)


def test_skipping_checksums_is_allowed_for_the_environment_folder(
    fake_fashion_mnist, tmp_path, monkeypatch
):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(fake_fashion_mnist.folder))

    prepared = prepare_data(verify_checksums=False, cache_dir=tmp_path / "cache", **DEFAULT_SPLIT)

    assert prepared.source == str(fake_fashion_mnist.folder.resolve())


# --- verifying a folder (cnn-train doctor) -------------------------------------------------------


@pytest.mark.parametrize(("damage", "message"), BROKEN_TRAIN_IMAGES)
def test_verify_reports_the_line_a_run_would_raise(fake_fashion_mnist, write_idx_gz, damage, message):
    damage(fake_fashion_mnist.folder / TRAIN_IMAGES_FILE, write_idx_gz)
    with pytest.raises(DatasetError) as raised:
        read_folder(fake_fashion_mnist.folder, verify_checksums=False)

    assert verify_dataset(fake_fashion_mnist.folder, verify_checksums=False) == [str(raised.value)]


def test_verify_reports_every_problem_one_line_each(fake_fashion_mnist, write_idx_gz):
    folder = fake_fashion_mnist.folder
    _truncate_gzip(folder / TRAIN_IMAGES_FILE, write_idx_gz)
    write_idx_gz(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(50, np.uint8), magic=2051)
    write_idx_gz(folder / "train-labels-idx1-ubyte.gz", np.zeros(190, np.uint8))  # no images to compare with

    problems = verify_dataset(folder, verify_checksums=False)

    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{folder / TRAIN_IMAGES_FILE}: not a complete gzip file")
    assert problems[1].startswith(f"{folder / 't10k-labels-idx1-ubyte.gz'}: wrong IDX magic number 2051")
    assert all("\n" not in line for line in problems)


def test_verify_reports_image_and_label_counts_that_disagree(fake_fashion_mnist, write_idx_gz):
    write_idx_gz(fake_fashion_mnist.folder / "t10k-labels-idx1-ubyte.gz", np.zeros(40, np.uint8))

    assert verify_dataset(fake_fashion_mnist.folder, verify_checksums=False) == [
        f"{fake_fashion_mnist.folder}: t10k-images-idx3-ubyte.gz holds 50 images but t10k-labels-idx1-ubyte.gz "
        "holds 40 labels; each image needs exactly one label. The two files come from different datasets "
        "or one is damaged"
    ]


def test_verify_checks_the_official_checksums_by_default(fake_fashion_mnist):
    problems = verify_dataset(fake_fashion_mnist.folder)

    assert [line.split(": ", 1)[1][:17] for line in problems] == ["checksum mismatch"] * 4
    assert verify_dataset(fake_fashion_mnist.folder, verify_checksums=False) == []


def test_verify_a_missing_folder_is_one_line_saying_how_to_get_the_data(tmp_path):
    (line,) = verify_dataset(tmp_path / "nowhere")

    assert line.startswith(f"{tmp_path / 'nowhere'}: no such folder. To fix: install Debian's")


def _unpack(folder: Path, target: Path, names) -> Path:
    """``folder``'s files in ``target``: those in ``names`` gunzipped (as Kaggle's copy holds them), the rest as they are."""
    target.mkdir()
    for name in data.FILE_NAMES:
        content = (folder / name).read_bytes()
        if name in names:
            (target / name.removesuffix(".gz")).write_bytes(gzip.decompress(content))
        else:
            (target / name).write_bytes(content)
    return target


@pytest.mark.parametrize("unpacked", [data.FILE_NAMES, data.FILE_NAMES[1::2]], ids=["all-unpacked", "two-unpacked"])
def test_unpacked_files_read_as_the_gzipped_ones(fake_fashion_mnist, tmp_path, unpacked):
    folder = _unpack(fake_fashion_mnist.folder, tmp_path / "unpacked", unpacked)

    raw, official = read_folder(folder, verify_checksums=False), read_folder(fake_fashion_mnist.folder, verify_checksums=False)

    assert raw.sha256 == official.sha256
    np.testing.assert_array_equal(raw.x_train, official.x_train)
    np.testing.assert_array_equal(raw.y_test, official.y_test)
    assert locate_fashion_mnist(folder, search_paths=[]) == folder
    assert prepare(folder, tmp_path / "cache").digest == prepare(fake_fashion_mnist.folder, tmp_path / "cache").digest


def test_a_damaged_unpacked_file_is_named(fake_fashion_mnist, tmp_path):
    folder = _unpack(fake_fashion_mnist.folder, tmp_path / "unpacked", data.FILE_NAMES)
    damaged = folder / "t10k-labels-idx1-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:20])

    assert verify_dataset(folder, verify_checksums=False) == [
        (
            f"{damaged}: truncated payload: the header announces 50 labels (58 bytes), the file holds 20 bytes. "
            "Replace it with an intact copy of the official file"
        )
    ]


def test_real_fashion_mnist_unpacked_is_verified_as_the_official_files(real_fashion_mnist_dir, tmp_path):
    assert verify_dataset(_unpack(real_fashion_mnist_dir, tmp_path / "unpacked", data.FILE_NAMES)) == []


# --- finding the files ---------------------------------------------------------------------------


def test_explicit_folder_lacking_files_names_them(fake_fashion_mnist):
    (fake_fashion_mnist.folder / "train-labels-idx1-ubyte.gz").unlink()
    (fake_fashion_mnist.folder / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(
        DatasetError,
        match=r"data_dir .* does not hold train-labels-idx1-ubyte\.gz, t10k-labels-idx1-ubyte\.gz; "
        r"it must contain all four",
    ):
        locate_fashion_mnist(fake_fashion_mnist.folder, search_paths=[])


def _refused_to_this_user(monkeypatch: pytest.MonkeyPatch, unreadable: Path, *, enter: bool) -> None:
    """What the OS does for a user other than root (the suite runs as root in CI, which reads anything):
    ``Path.is_dir()`` of a folder it cannot enter raises, and ``os.access`` says no for a 0600 file not its own."""
    if not enter:
        is_dir = Path.is_dir

        def refusing_is_dir(path: Path) -> bool:
            if path == unreadable:
                raise PermissionError(13, "Permission denied", str(path))
            return is_dir(path)

        monkeypatch.setattr(Path, "is_dir", refusing_is_dir)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).parent != unreadable and access(path, mode))


@pytest.mark.parametrize(
    ("enter", "says"),
    [
        pytest.param(False, "data_dir: {folder} cannot be read by this user (permission denied); name a folder you "
                     "can read, or leave it empty to search the usual places", id="a-folder-it-cannot-enter"),
        pytest.param(True, "data_dir: {folder} holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, which this user cannot read (permission denied)",
                     id="files-it-cannot-read"),
    ],
)
def test_a_folder_the_user_cannot_read_is_said_in_one_line(fake_fashion_mnist, monkeypatch, enter, says):
    """A non-root user naming another account's folder got a PermissionError traceback (or, for 0600
    files, a failed flow run with its MLflow run recorded)."""
    _refused_to_this_user(monkeypatch, fake_fashion_mnist.folder, enter=enter)
    with pytest.raises(DatasetError) as raised:
        locate_fashion_mnist(fake_fashion_mnist.folder, search_paths=[])
    assert str(raised.value) == says.format(folder=fake_fashion_mnist.folder)


def test_an_explicit_folder_with_none_of_the_files_names_them_once(tmp_path):
    with pytest.raises(DatasetError) as raised:
        locate_fashion_mnist(tmp_path, search_paths=[])
    assert str(raised.value).startswith(
        f"data_dir {tmp_path} holds none of the four Fashion-MNIST files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, or each without .gz). "
        "Point it at a folder"
    )


def test_environment_folder_lacking_files_is_an_error_not_a_fall_through(
    make_fashion_mnist, tmp_path, monkeypatch
):
    complete = make_fashion_mnist(tmp_path / "complete").folder
    (tmp_path / "empty").mkdir()  # a folder that does not exist is said as such (test_doctor)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "empty"))

    with pytest.raises(DatasetError, match=r"\$CNN_TRAIN_DATA_DIR .*empty holds none of the four Fashion-MNIST files \(train-images"):
        locate_fashion_mnist(search_paths=[complete])


def test_search_order_is_argument_environment_then_search_paths(make_fashion_mnist, tmp_path, monkeypatch):
    given, env, first, second = (
        make_fashion_mnist(tmp_path / name).folder for name in ("given", "env", "first", "second")
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / TRAIN_IMAGES_FILE).write_bytes(b"")

    assert locate_fashion_mnist(search_paths=[tmp_path / "missing", partial, first, second]) == first
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
    assert locate_fashion_mnist(search_paths=[first]) == env
    assert locate_fashion_mnist(given, search_paths=[first]) == given


def test_nothing_found_lists_every_place_and_how_to_get_the_data_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DatasetError) as raised:
        locate_fashion_mnist(allow_download=False, search_paths=[tmp_path / "missing", empty])

    message = str(raised.value)
    assert "\n" not in message
    assert f"{tmp_path / 'missing'} (does not exist); " in message
    assert f"{empty} (lacks train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, " in message
    assert "download not allowed (allow_download=False)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "CNN_TRAIN_DATA_DIR" in message


def test_a_failed_download_is_reported_with_the_places_looked_at(tmp_path, monkeypatch):
    def offline(target, **kwargs):
        raise DatasetError("could not download train-images-idx3-ubyte.gz: network unreachable")

    monkeypatch.setattr("cnn_train.flows.data.locate.download_fashion_mnist", offline)

    with pytest.raises(DatasetError, match=r"missing \(does not exist\); download failed: .*network unreachable"):
        locate_fashion_mnist(search_paths=[tmp_path / "missing"])


def test_default_search_paths_are_debian_keras_cache_then_downloads(tmp_path):
    assert data.default_search_paths() == [
        Path("/usr/share/datasets/fashion-mnist"),
        tmp_path / "keras-home" / "datasets" / "fashion-mnist",
        tmp_path / "state" / "data" / "fashion-mnist",
    ]


def test_the_network_guard_reaches_downloads(tmp_path):
    with pytest.raises(AssertionError, match=r"a test tried to download https://x\.invalid/"):
        data.download_fashion_mnist(tmp_path / "downloads", urls=("https://x.invalid/",))


def test_download_falls_back_to_the_next_url_and_keeps_only_verified_files(
    real_fashion_mnist_dir, tmp_path, monkeypatch
):
    fetched = []

    def fetch(url: str, timeout: float) -> bytes:
        fetched.append(url)
        if url.startswith("https://primary.invalid/"):
            raise urllib.error.URLError("connection refused")
        return (real_fashion_mnist_dir / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(data.locate, "_fetch", fetch)
    target = tmp_path / "downloads"

    data.download_fashion_mnist(target, urls=("https://primary.invalid/", "https://mirror.invalid/"))

    assert len(fetched) == 8
    for name in data.FILE_NAMES:
        assert (target / name).read_bytes() == (real_fashion_mnist_dir / name).read_bytes()
    prepared = prepare_data(target, cache_dir=tmp_path / "cache", sample_limit=100, test_limit=10, **DEFAULT_SPLIT)
    assert prepared.source == "https://mirror.invalid/"


def test_download_refuses_files_that_are_not_the_official_ones(fake_fashion_mnist, tmp_path, monkeypatch):
    def fetch(url: str, timeout: float) -> bytes:
        return (fake_fashion_mnist.folder / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(data.locate, "_fetch", fetch)
    target = tmp_path / "downloads"

    with pytest.raises(
        DatasetError,
        match=r"could not download train-images-idx3-ubyte\.gz: "
        r"https://a\.invalid/train-images-idx3-ubyte\.gz: checksum mismatch"
        r".* This server does not send the official file\.; "
        r"https://b\.invalid/train-images-idx3-ubyte\.gz: checksum mismatch",
    ):
        data.download_fashion_mnist(target, urls=("https://a.invalid/", "https://b.invalid/"))
    assert not any(target.iterdir())


# --- checking the split arguments ----------------------------------------------------------------

#: id -> (check_split arguments, what the error must say); no files are read.
BAD_SPLITS = {
    "fraction-zero": ({"validation_fraction": 0}, r"^validation_fraction must lie strictly between 0 and 1"),
    "fraction-one": ({"validation_fraction": 1.0}, r"strictly between 0 and 1 .*got 1\.0$"),
    "fraction-nan": ({"validation_fraction": math.nan}, r"strictly between 0 and 1 .*got nan$"),
    "fraction-string": (
        {"validation_fraction": "0.1"}, r"^validation_fraction must be a number in \(0, 1\), got '0\.1'$"
    ),
    "seed-negative": ({"seed": -1}, r"^seed must be an integer in \[0, 2\*\*32\), got -1$"),
    "seed-bool": ({"seed": True}, r"^seed must be an integer .*got True$"),
    "limit-too-small": ({"sample_limit": 19}, r"^sample_limit must be None .* in \[20, 60000\], got 19$"),
    "limit-too-large": ({"sample_limit": 60001}, r"\[20, 60000\], got 60001$"),
    "limit-float": ({"sample_limit": 100.0}, r"^sample_limit must be None .*got 100\.0$"),
    "limit-above-the-files": (
        {"sample_limit": 500, "train_images": 200},
        r"^sample_limit must be None \(all 200 training images\) or an integer in \[20, 200\], got 500$",
    ),
    "test-limit-too-small": ({"test_limit": 9}, r"^test_limit must be None .* \[10, 10000\] .*got 9$"),
    "test-limit-above-the-files": ({"test_limit": 60, "test_images": 50}, r"\[10, 50\] .*got 60$"),
    "fraction-leaves-no-training-images": (
        {"sample_limit": 200, "validation_fraction": 0.999},
        r"^validation_fraction=0\.999 leaves too few training images: 0 of sample_limit=200 \(200 go to "
        r"validation\), and a stratified split needs at least 10 in each \(one per class\); "
        r"use validation_fraction between 0\.05 and 0\.95 or sample_limit >= 10000$",
    ),
    "fraction-too-large-for-all-images": (
        {"validation_fraction": 0.99999},
        r"^validation_fraction=0\.99999 leaves too few training images: 0 of the 60000 training images .*"
        r"use validation_fraction between 0\.00017 and 0\.99983$",
    ),
    "limit-too-small-for-the-fraction": (
        {"sample_limit": 20, "validation_fraction": 0.1},
        r"^validation_fraction=0\.1 leaves too few validation images: 2 of sample_limit=20 \(18 go to "
        r"training\).*use validation_fraction=0\.5 or sample_limit >= 91$",
    ),
    "fraction-too-small-for-the-files": (
        {"validation_fraction": 0.001, "train_images": 200},
        r"too few validation images: 1 of the 200 training images .*use validation_fraction between "
        r"0\.05 and 0\.95$",
    ),
}


@pytest.mark.parametrize(("arguments", "message"), list(BAD_SPLITS.values()), ids=list(BAD_SPLITS))
def test_bad_split_arguments_say_the_cause_and_what_is_allowed(arguments, message):
    arguments = {"sample_limit": None, "validation_fraction": 0.1} | arguments

    with pytest.raises(SplitError, match=message) as raised:
        check_split(**arguments)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("arguments", "sizes"),
    [
        pytest.param({"sample_limit": None, "validation_fraction": 0.1}, (54000, 6000, 10000), id="defaults"),
        pytest.param({"sample_limit": 200, "validation_fraction": 0.05}, (190, 10, 10000), id="smallest-fraction"),
        pytest.param({"sample_limit": 200, "validation_fraction": 0.95}, (10, 190, 10000), id="largest-fraction"),
        pytest.param(
            {"sample_limit": 20, "validation_fraction": 0.5, "test_limit": 10}, (10, 10, 10), id="smallest-everything"
        ),
    ],
)
def test_a_good_split_is_planned(arguments, sizes):
    plan = check_split(**arguments)

    assert (plan.train_size, plan.validation_size, plan.test_size) == sizes


def test_the_split_is_checked_again_against_the_files(fake_fashion_mnist, tmp_path):
    with pytest.raises(SplitError, match=r"sample_limit must be None \(all 200 training images\)"):
        prepare(fake_fashion_mnist.folder, tmp_path / "cache", sample_limit=500)
    with pytest.raises(SplitError, match=r"0\.001 leaves too few validation images: 1 of the 200 training"):
        prepare(fake_fashion_mnist.folder, tmp_path / "cache", validation_fraction=0.001)


def test_bad_split_arguments_fail_before_any_file_is_looked_for(tmp_path):
    with pytest.raises(SplitError, match=r"leaves too few training images"):
        prepare_data(tmp_path / "nowhere", sample_limit=200, validation_fraction=0.999, seed=0)


# --- splitting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "per_class"),
    [
        pytest.param(
            {"validation_fraction": 0.25},
            {"train": 15, "validation": 5, "test": 5},
            id="all-images-quarter-val",
        ),
        pytest.param(
            {"validation_fraction": 0.1, "sample_limit": 100, "test_limit": 20},
            {"train": 9, "validation": 1, "test": 2},
            id="limited-tenth-val",
        ),
    ],
)
def test_splits_are_stratified(fake_fashion_mnist, tmp_path, options, per_class):
    prepared = prepare(fake_fashion_mnist.folder, tmp_path / "cache", **options)

    assert prepared.summary() == {split: 10 * n for split, n in per_class.items()}
    labels = {"train": prepared.y_train, "validation": prepared.y_val, "test": prepared.y_test}
    for split, n in per_class.items():
        assert np.bincount(labels[split], minlength=10).tolist() == [n] * 10, split


def test_splits_are_scaled_images_of_the_files_with_their_labels(fake_fashion_mnist, tmp_path):
    fake = fake_fashion_mnist
    prepared = prepare(fake.folder, tmp_path / "cache", sample_limit=150, test_limit=30)
    label_of_train_image = {image.tobytes(): int(y) for image, y in zip(fake.x_train, fake.y_train)}
    label_of_test_image = {image.tobytes(): int(y) for image, y in zip(fake.x_test, fake.y_test)}

    for x, y, source in (
        (prepared.x_train, prepared.y_train, label_of_train_image),
        (prepared.x_val, prepared.y_val, label_of_train_image),
        (prepared.x_test, prepared.y_test, label_of_test_image),
    ):
        assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        originals = np.rint(x[..., 0] * 255).astype(np.uint8)
        np.testing.assert_array_equal(x[..., 0], originals.astype(np.float32) / np.float32(255))
        assert [source[img.tobytes()] for img in originals] == y.tolist()
    train_and_val = np.rint(np.concatenate([prepared.x_train, prepared.x_val]) * 255).astype(np.uint8)
    assert len({image.tobytes() for image in train_and_val}) == 150, "the same image twice"


def test_same_seed_same_split_other_seed_other_split(fake_fashion_mnist, tmp_path):
    first = prepare(fake_fashion_mnist.folder, tmp_path / "a", sample_limit=100, test_limit=20, seed=7)
    again = prepare(fake_fashion_mnist.folder, tmp_path / "b", sample_limit=100, test_limit=20, seed=7)
    other = prepare(fake_fashion_mnist.folder, tmp_path / "c", sample_limit=100, test_limit=20, seed=8)

    assert_same_splits(first, again)
    assert first.digest == again.digest
    assert other.digest != first.digest
    assert not np.array_equal(other.y_train, first.y_train)


def test_the_test_subset_is_the_same_for_every_seed(fake_fashion_mnist, tmp_path):
    """The seed draws the training images only: runs that differ in their seed are scored on one test set,
    so the registry compares them (a seeded subset made every such champion incomparable)."""
    first = prepare(fake_fashion_mnist.folder, tmp_path / "a", sample_limit=100, test_limit=20, seed=7)
    other = prepare(fake_fashion_mnist.folder, tmp_path / "b", sample_limit=100, test_limit=20, seed=8)

    assert len(first.y_test) == 20
    np.testing.assert_array_equal(other.x_test, first.x_test)
    np.testing.assert_array_equal(other.y_test, first.y_test)
    assert other.test_digest == first.test_digest
    assert not np.array_equal(other.y_train, first.y_train)


def test_digest_is_short_and_follows_the_split_parameters(fake_fashion_mnist, tmp_path):
    variants = ({}, {"sample_limit": 200, "test_limit": 50}, {"seed": 1}, {"validation_fraction": 0.2})
    folder = fake_fashion_mnist.folder
    digests = {prepare(folder, tmp_path / "cache", **options).digest for options in variants}

    assert len(digests) == 3, "an explicit limit equal to the whole set is the same data"
    assert all(len(d) == 16 for d in digests)


def test_prepared_data_describes_itself(fake_fashion_mnist, tmp_path):
    prepared = prepare(fake_fashion_mnist.folder, tmp_path / "cache")

    assert prepared.class_names == FASHION_MNIST_CLASSES
    assert prepared.source == str(fake_fashion_mnist.folder.resolve())
    train_data = prepared.train_data()
    assert isinstance(train_data, TrainData)
    assert train_data.x_val is prepared.x_val


# --- caching -------------------------------------------------------------------------------------


def _forbid_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*args, **kwargs):
        raise AssertionError("the files were parsed again although the cache holds this split")

    monkeypatch.setattr("cnn_train.flows.data.prepare.read_folder", parse)


def test_a_cached_split_is_returned_without_parsing(fake_fashion_mnist, tmp_path, monkeypatch):
    first = prepare(fake_fashion_mnist.folder, tmp_path / "cache", sample_limit=100)
    _forbid_parsing(monkeypatch)

    second = prepare(fake_fashion_mnist.folder, tmp_path / "cache", sample_limit=100)

    assert_same_splits(first, second)
    assert (second.digest, second.source) == (first.digest, first.source)
    assert second.x_train.dtype == np.float32 and second.x_train.flags.writeable


def test_a_split_cached_without_verification_is_not_served_to_a_verifying_run(fake_fashion_mnist, tmp_path):
    prepare(fake_fashion_mnist.folder, tmp_path / "cache")

    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: checksum mismatch"):
        prepare_data(fake_fashion_mnist.folder, cache_dir=tmp_path / "cache", **DEFAULT_SPLIT)


def _cache_file(cache_dir: Path) -> Path:
    (path,) = cache_dir.glob("*.npz")
    return path


DAMAGES = Cases()


@DAMAGES("truncated")
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@DAMAGES("garbage")
def _overwrite_with_garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 100)


@DAMAGES("flipped-byte")
def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    path.write_bytes(bytes(blob))


@DAMAGES("wrong-shapes")
def _store_other_shapes(path: Path) -> None:
    three_of_each = {name: np.zeros((3, 28, 28) if name[0] == "x" else 3, np.uint8) for name in SPLITS}
    with path.open("wb") as file:
        np.savez(file, **three_of_each)


@DAMAGES("empty")
def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", DAMAGES.params)
def test_a_damaged_cache_is_rebuilt(fake_fashion_mnist, tmp_path, monkeypatch, damage, caplog):
    cache_dir = tmp_path / "cache"
    first = prepare(fake_fashion_mnist.folder, cache_dir)
    damage(_cache_file(cache_dir))

    rebuilt = prepare(fake_fashion_mnist.folder, cache_dir)

    assert_same_splits(first, rebuilt)
    assert "rebuilding the damaged data cache" in caplog.text
    _forbid_parsing(monkeypatch)
    assert_same_splits(first, prepare(fake_fashion_mnist.folder, cache_dir))


def test_an_unreadable_file_memo_only_costs_a_reparse(fake_fashion_mnist, tmp_path):
    cache_dir = tmp_path / "cache"
    first = prepare(fake_fashion_mnist.folder, cache_dir)
    (memo,) = cache_dir.glob("files-*.json")
    memo.write_text("{not json")

    assert_same_splits(first, prepare(fake_fashion_mnist.folder, cache_dir))


def test_changed_files_are_not_served_from_the_cache(make_fashion_mnist, tmp_path):
    cache_dir = tmp_path / "cache"
    folder = tmp_path / "fashion-mnist"
    first = prepare(make_fashion_mnist(folder, seed=0).folder, cache_dir)
    changed = make_fashion_mnist(folder, seed=1)
    for name in data.FILE_NAMES:  # same sizes: only the timestamps betray the change
        os.utime(folder / name, ns=(10**18, 10**18))

    second = prepare(changed.folder, cache_dir)

    assert second.digest != first.digest
    assert not np.array_equal(second.x_test, first.x_test)


def test_an_unusable_cache_dir_does_not_stop_the_run(fake_fashion_mnist, tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache folder should be")

    prepared = prepare(fake_fashion_mnist.folder, not_a_dir)

    assert prepared.summary() == {"train": 180, "validation": 20, "test": 50}


def _cached_digests(cache_dir: Path) -> set[str]:
    return {path.stem for path in cache_dir.glob("*.npz")}


def _make_long_unused(cache_dir: Path) -> None:
    """Date every cached split back, oldest first in creation order: file times tick too coarsely
    for splits made a few milliseconds apart to be told apart otherwise."""
    by_age = sorted(cache_dir.glob("*.npz"), key=lambda path: path.stat().st_mtime_ns)
    hour_ago = time.time() - 3600
    for offset, path in enumerate(by_age):
        os.utime(path, (hour_ago + offset, hour_ago + offset))


def test_the_cache_keeps_only_the_most_recently_used_splits(fake_fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHED_SPLITS_ENV, "2")
    cache_dir = tmp_path / "cache"
    digest = {}
    for seed in (1, 2):
        digest[seed] = prepare(fake_fashion_mnist.folder, cache_dir, seed=seed).digest
        _make_long_unused(cache_dir)
    prepare(fake_fashion_mnist.folder, cache_dir, seed=1)  # a hit makes seed 1's split the recent one

    digest[3] = prepare(fake_fashion_mnist.folder, cache_dir, seed=3).digest

    assert _cached_digests(cache_dir) == {digest[1], digest[3]}


def test_the_cache_bound_defaults_to_a_few_splits(fake_fashion_mnist, tmp_path):
    cache_dir = tmp_path / "cache"
    digests = []
    for seed in range(data.MAX_CACHED_SPLITS + 1):
        digests.append(prepare(fake_fashion_mnist.folder, cache_dir, seed=seed).digest)
        _make_long_unused(cache_dir)

    assert data.MAX_CACHED_SPLITS == 4
    assert _cached_digests(cache_dir) == set(digests[1:])


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5"], ids=["zero", "negative", "word", "fraction"])
def test_a_bad_cache_bound_warns_and_keeps_the_default(fake_fashion_mnist, tmp_path, monkeypatch, caplog, value):
    monkeypatch.setenv(data.CACHED_SPLITS_ENV, value)

    prepare(fake_fashion_mnist.folder, tmp_path / "cache")

    expected = f"ignoring $CNN_TRAIN_CACHED_SPLITS={value!r}: it must be a whole number, at least 1; using 4"
    assert expected in caplog.text


# --- the real files ------------------------------------------------------------------------------


def test_real_fashion_mnist_is_verified_and_split(real_fashion_mnist_dir, tmp_path):
    assert verify_dataset(real_fashion_mnist_dir) == []

    prepared = prepare_data(real_fashion_mnist_dir, cache_dir=tmp_path / "cache", search_paths=[], **DEFAULT_SPLIT)

    assert prepared.summary() == {"train": 54000, "validation": 6000, "test": 10000}
    assert prepared.x_train.shape == (54000, 28, 28, 1) and prepared.x_train.dtype == np.float32
    assert 0.0 == prepared.x_test.min() and prepared.x_test.max() == 1.0
    assert np.bincount(prepared.y_val).tolist() == [600] * 10
    assert np.bincount(prepared.y_test).tolist() == [1000] * 10
    assert prepared.source == str(real_fashion_mnist_dir)
