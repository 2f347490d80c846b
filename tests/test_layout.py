"""The repository keeps the shape README "Layout" describes: modules split along their seams."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Longest a source module may grow before it is split (a newcomer reads one concern per file).
MAX_MODULE_LINES = 400


@pytest.mark.parametrize("package", ["flows", "plugins", "backends"])
def test_no_source_module_is_longer_than_the_limit(package: str) -> None:
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in (ROOT / package).rglob("*.py")}
    assert lengths, f"no modules under {package}/"
    too_long = {path: lines for path, lines in lengths.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"longer than {MAX_MODULE_LINES} lines, split along a seam: {too_long}"


@pytest.mark.parametrize("folder", ["flows", "flows/ops"])
def test_the_readme_layout_names_every_module_and_folder(folder: str) -> None:
    """A newcomer finds a concern from the Layout: leases.py, crashes.py, errors.py, auth.py and
    registering.py were missing from it."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```", 2)[1]
    named = {path.name for path in (ROOT / folder).iterdir() if path.name != "__init__.py" and path.name != "__pycache__"
             and (path.suffix == ".py" or path.is_dir())}
    unnamed = sorted(name for name in named if (f"{name}/" if (ROOT / folder / name).is_dir() else name) not in layout
                     and not (name.endswith("_flow.py") and "*_flow.py" in layout))
    assert not unnamed, f"README Layout does not name: {unnamed}"
