"""The comparison report of several runs: ``compare.md``, ``comparison.csv`` and a confusion matrix per run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnn_train.flows.reporting.comparison import ComparisonRow, comparison_table, parity_verdict
from cnn_train.flows.reporting.figures import plot_confusion_matrix
from cnn_train.flows.reporting.markdown import link_line, markdown_table
from cnn_train.flows.reporting.tables import ClassificationSummary


@dataclass(frozen=True)
class ComparisonFiles:
    """What :func:`write_comparison_report` wrote."""

    report_md: Path
    table_csv: Path
    confusion_matrices: tuple[Path, ...]


def write_comparison_report(
    rows: Sequence[ComparisonRow],
    summaries: Mapping[str, ClassificationSummary],
    out_dir: Path | str,
    *,
    title: str,
    tolerance_points: float = 1.0,
    links: Mapping[str, str | None] | None = None,
    open_hint: str | None = None,
) -> ComparisonFiles:
    """``compare.md``, ``comparison.csv`` and one confusion-matrix PNG per row, side by side.

    ``summaries`` holds each row's test-set summary by row name. ``links`` maps a label to an http(s)
    URL, or to None to leave it out; ``open_hint`` says how to open the runs when there is no link.
    """
    missing = [row.name for row in rows if row.name not in summaries]
    if missing:
        raise ValueError(f"no classification summary for {missing}; summaries has {sorted(summaries)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(rows)
    table_csv = out_dir / "comparison.csv"
    table.to_csv(table_csv, index=False)
    verdict = parity_verdict({row.name: row.test_accuracy for row in rows}, tolerance_points)
    pictures = tuple(
        plot_confusion_matrix(summaries[row.name], out_dir / f"confusion_matrix_{row.name}.png", whose=row.name) for row in rows
    )
    lines = [f"# {title}", "", *link_line(links or {})]
    if open_hint:
        lines += [open_hint, ""]
    lines += [markdown_table(table), "", f"**Verdict**: {verdict}", ""]
    for row, picture in zip(rows, pictures, strict=True):
        lines += [f"## {row.name}", "", f"![Confusion matrix, {row.name}]({picture.name})", ""]
    report_md = out_dir / "compare.md"
    report_md.write_text("\n".join(lines), encoding="utf-8")
    return ComparisonFiles(report_md, table_csv, pictures)
