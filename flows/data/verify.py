"""Check a dataset folder the way a run reads it, reporting every problem instead of the first."""

from __future__ import annotations

from pathlib import Path

from cnn_train.flows.data.files import FILES, DatasetError
from cnn_train.flows.data.idx import count_mismatches, read_idx
from cnn_train.flows.data.locate import HOW_TO_GET


def verify_dataset(folder: Path | str, *, verify_checksums: bool = True) -> list[str]:
    """Problems a run would hit reading ``folder``, one line each; an empty list means it is fine.

    Each of the four files must be present, an intact gzip, an IDX file with the right magic number,
    dimensions and item count, and (unless ``verify_checksums=False``) the official content; each
    images file needs as many labels. This parses the files as a run does (about a second for the
    real dataset), and does not use or fill the split cache.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return [f"{folder}: no such folder. To fix: {HOW_TO_GET}"]
    problems = []
    counts = {}
    for spec in FILES:
        try:
            counts[spec.name] = len(read_idx(spec.path_in(folder), spec, verify_checksum=verify_checksums).array)
        except DatasetError as error:
            problems.append(str(error))
    return problems + count_mismatches(folder, counts)
