"""Find the four Fashion-MNIST files: a folder the user named, the usual places, else a download."""

from __future__ import annotations

import http.client
import logging
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cnn_train.flows.data.atomic import write_atomically
from cnn_train.flows.data.files import FILE_NAMES, FILES, DatasetError
from cnn_train.flows.data.idx import check_content, decompress
from cnn_train.flows.settings import state_dir

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CNN_TRAIN_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where Keras (and then the zalando repository) serve the official files, in the order tried.
DOWNLOAD_URLS: tuple[str, ...] = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
DOWNLOAD_TIMEOUT_SECONDS = 15.0
HOW_TO_GET = (
    f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    f"pass data_dir / set {DATA_DIR_ENV} to a folder holding the four files, or allow the download"
)
# Records which mirror filled our download folder, so runs on those files report the URL.
SOURCE_MARKER = ".source-url"
DOWNLOAD_MISMATCH_FIX = "This server does not send the official file."


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
    """The files ``folder`` holds neither as the official ``.gz`` nor unpacked."""
    return [spec.name for spec in FILES if not spec.path_in(folder).is_file()]


def explicit_dir(data_dir: Path | str | None) -> tuple[Path, str] | None:
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
    if explicit := explicit_dir(data_dir):
        folder, named_by = explicit
        try:
            return _named_folder(folder, named_by)
        except PermissionError:  # Path.is_dir() and is_file() raise it in a folder this user cannot enter
            raise DatasetError(
                f"{named_by}: {folder} cannot be read by this user (permission denied); name a "
                "folder you can read, or leave it empty to search the usual places"
            ) from None

    candidates = default_search_paths() if search_paths is None else [Path(p) for p in search_paths]
    looked_at = []
    for folder in candidates:
        try:
            missing = _missing_files(folder)
        except PermissionError:
            looked_at.append(f"{folder} (cannot be read by this user)")
            continue
        if not missing:
            return folder
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        looked_at.append(f"{folder} ({what})")

    if allow_download:
        try:
            return download_fashion_mnist(download_dir())
        except DatasetError as error:
            looked_at.append(f"download failed: {error}")
    else:
        looked_at.append("download not allowed (allow_download=False)")
    raise DatasetError(
        f"Fashion-MNIST not found: looked for the four files ({', '.join(FILE_NAMES)}) in "
        f"{'; '.join(looked_at)}. To fix: {HOW_TO_GET}."
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
                check_content(decompress(blob, url), spec, url, verify_checksum=True, fix=DOWNLOAD_MISMATCH_FIX)
            except DatasetError as error:
                failures.append(str(error))
                continue
            except (OSError, http.client.HTTPException) as error:
                failures.append(f"{url}: {error}")
                continue
            write_atomically(target / spec.name, lambda file: file.write(blob))
            used.append(base)
            break
        else:
            raise DatasetError(f"could not download {spec.name}: " + "; ".join(failures))
    write_atomically(target / SOURCE_MARKER, lambda file: file.write(used[0].encode()))
    log.info("downloaded Fashion-MNIST from %s into %s", used[0], target)
    return target


def source_of(folder: Path) -> str:
    """The URL a download came from, else the folder itself: what a run reports as its data source."""
    marker = folder / SOURCE_MARKER
    return marker.read_text().strip() if marker.is_file() else str(folder.resolve())


def _named_folder(folder: Path, named_by: str) -> Path:
    """``folder``, the one the user named, when it holds the four files and this user can read them."""
    if not folder.is_dir():
        what = f"is a file; name the folder holding it ({folder.parent})" if folder.is_file() else (
            "does not exist; name the folder holding the four Fashion-MNIST files"
        )
        raise DatasetError(f"{named_by}: {folder} {what}, or leave it empty to search the usual places")
    if missing := _missing_files(folder):
        lacks = (
            f"holds none of the four Fashion-MNIST files ({', '.join(FILE_NAMES)}, or each without .gz)"
            if len(missing) == len(FILE_NAMES)
            else f"does not hold {', '.join(missing)}; it must contain all four Fashion-MNIST files, gzipped or not"
        )
        raise DatasetError(
            f"{named_by} {folder} {lacks}. Point it at a folder that does, or unset it to search the "
            f"usual places ({DEBIAN_DIR}, the Keras cache, a download)"
        )
    if unreadable := [path.name for path in (spec.path_in(folder) for spec in FILES) if not os.access(path, os.R_OK)]:
        raise DatasetError(f"{named_by}: {folder} holds {', '.join(unreadable)}, which this user cannot read (permission denied)")
    return folder
