"""What a person reads: tables with human numbers (in markdown or as records), links that open,
figure links.

Raw values stay in the DataFrames and CSV files; only what a person reads rounds them, by column
name, so every table prints an accuracy, a loss or a throughput the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import numpy as np
import pandas as pd

Formatter = Callable[[object], str]

_MISSING = "n/a"


def format_percent(fraction: float, decimals: int = 2) -> str:
    """``0.91234`` as ``"91.23%"``."""
    return f"{fraction * 100:.{decimals}f}%"


def _is_missing(value: object) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def number_format(spec: str) -> Formatter:
    """A formatter applying the format spec ``spec`` (e.g. ``",.0f"``), ``n/a`` for a missing value."""
    return lambda value: _MISSING if _is_missing(value) else format(value, spec)


def percent_format(value: object) -> str:
    """A fraction as a percentage with 2 decimals, ``n/a`` when missing."""
    return _MISSING if _is_missing(value) else format_percent(float(value))  # type: ignore[arg-type]


_THREE_DECIMALS = number_format(".3f")
_WHOLE_NUMBER = number_format(",.0f")

#: How a column is printed, by name: a column called ``accuracy`` or ending in ``_accuracy``
#: (``test_accuracy``, ``val_accuracy``) is a percentage, and so on.
COLUMN_FORMATS: Mapping[str, Formatter] = MappingProxyType({
    "accuracy": percent_format,
    "loss": number_format(".4f"),
    "seconds": number_format(".1f"),
    "seconds_per_epoch": number_format(".1f"),
    "images_per_second": _WHOLE_NUMBER,
    "test_images": _WHOLE_NUMBER,
    "parameters": _WHOLE_NUMBER,
    "support": _WHOLE_NUMBER,
    "precision": _THREE_DECIMALS,
    "recall": _THREE_DECIMALS,
    "f1": _THREE_DECIMALS,
})


def _column_format(column: str) -> Formatter | None:
    for name, formatter in COLUMN_FORMATS.items():
        if column == name or column.endswith(f"_{name}"):
            return formatter
    return None


def _plain(value: object) -> str:
    if _is_missing(value):
        return _MISSING
    # A float in a column with no known meaning (a learning rate, a dropout share) keeps 6
    # significant digits rather than all 17.
    return format(value, ".6g") if isinstance(value, float | np.floating) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _formatted_rows(frame: pd.DataFrame, formats: Mapping[str, Formatter] | None) -> list[list[str]]:
    """Each row's cells as text: by ``formats[column]`` when given, else by the column's name
    (:data:`COLUMN_FORMATS`), else plainly."""
    formats = formats or {}
    formatters = [formats.get(str(column)) or _column_format(str(column)) or _plain for column in frame.columns]
    return [
        [formatter(value) for formatter, value in zip(formatters, record, strict=True)]
        for record in frame.itertuples(index=False)
    ]


def markdown_table(frame: pd.DataFrame, formats: Mapping[str, Formatter] | None = None) -> str:
    """``frame`` as a GitHub markdown table, numbers right-aligned and formatted for a reader.

    ``formats`` maps a column to its formatter; other columns are formatted by their name (an
    ``accuracy`` or ``*_accuracy`` column as a percentage, ...), else plainly. Underscores in headers
    become spaces.
    """
    header = "| " + " | ".join(_cell(str(column).replace("_", " ")) for column in frame.columns) + " |"
    aligns = ["---:" if pd.api.types.is_numeric_dtype(frame[column]) else ":---" for column in frame.columns]
    lines = [header, "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(map(_cell, cells)) + " |" for cells in _formatted_rows(frame, formats)]
    return "\n".join(lines)


def table_records(frame: pd.DataFrame, formats: Mapping[str, Formatter] | None = None) -> list[dict[str, str]]:
    """``frame``'s rows as records of cells formatted as :func:`markdown_table` does, for tables a
    person reads elsewhere (Prefect table artifacts)."""
    columns = [str(column) for column in frame.columns]
    return [dict(zip(columns, cells, strict=True)) for cells in _formatted_rows(frame, formats)]


def key_value_table(pairs: Sequence[tuple[str, object]], header: tuple[str, str]) -> str:
    """Two-column markdown table of already formatted values, e.g. ``("metric", "value")``."""
    return markdown_table(pd.DataFrame([(key, str(value)) for key, value in pairs], columns=list(header)))


def check_web_url(what: str, url: str | None) -> None:
    """Refuse a link a browser cannot open (a ``sqlite:`` store, ``None/runs/...``); None means no link."""
    if url is not None and urlparse(url).scheme not in ("http", "https"):
        raise ValueError(
            f"{what} must be an http(s) URL a browser can open, got {url!r}; "
            "pass None when there is no web UI to link to"
        )


def link_line(links: Mapping[str, str | None]) -> list[str]:
    """``["[MLflow run](http://...) · [Prefect flow run](http://...)", ""]``, leaving out absent links."""
    for label, url in links.items():
        check_web_url(f"the {label} link", url)
    present = [f"[{label}]({url})" for label, url in links.items() if url is not None]
    return [" · ".join(present), ""] if present else []


def figure_link(caption: str, path: Path | None) -> list[str]:
    """``["![caption](file.png)", ""]`` for a drawn figure, linked by file name; nothing for one not drawn."""
    return [f"![{caption}]({path.name})", ""] if path is not None else []


_FIGURE_LINK = re.compile(r"(!\[[^\]]*\]\()([\w.-]+\.png)(\))")


def relink_figures(markdown: str, url_for: Callable[[str], str]) -> str:
    """``markdown`` with each figure's file name replaced by ``url_for(name)``, for viewers (the
    Prefect UI) that do not have the files beside the document."""
    return _FIGURE_LINK.sub(lambda m: f"{m.group(1)}{url_for(m.group(2))}{m.group(3)}", markdown)
