"""Files a person wants to look at after a run: metric tables, figures, ``report.md`` and the
comparison of several runs.

Plain functions with no Prefect, MLflow or backend imports, so each piece can be called and
tested on its own. Callers write ``from cnn_train.flows import reporting`` and then
``reporting.write_report(...)``.

- :mod:`.tables`: per-class metrics and confusion matrix (scikit-learn), the per-epoch table
- :mod:`.comparison`: comparison rows, their table, the accuracy gap and parity verdict
- :mod:`.markdown`: human numbers in markdown tables and table records, links, figure links
- :mod:`.canvas`, :mod:`.figures`, :mod:`.grids`: the PNG figures
- :mod:`.run_report`: one run's ``report.md`` and files
- :mod:`.comparison_report`: several runs' ``compare.md`` and files
"""

from cnn_train.flows.reporting.comparison import (
    COMPARISON_COLUMNS,
    ComparisonRow,
    accuracy_gap_points,
    cnn_against_dense_sentence,
    comparison_table,
    parity_verdict,
)
from cnn_train.flows.reporting.comparison_report import ComparisonFiles, write_comparison_report
from cnn_train.flows.reporting.figures import plot_confusion_matrix, plot_learning_curves
from cnn_train.flows.reporting.grids import (
    Predictions,
    confident_mistakes,
    feature_map_title,
    plot_confident_mistakes,
    plot_feature_maps,
    plot_kernels,
    plot_predictions_grid,
    prediction_title,
)
from cnn_train.flows.reporting.markdown import (
    COLUMN_FORMATS,
    Formatter,
    format_percent,
    markdown_table,
    number_format,
    percent_format,
    relink_figures,
    table_records,
)
from cnn_train.flows.reporting.run_report import (
    FigureFiles,
    ReportFiles,
    ReportInputs,
    render_report_markdown,
    run_description,
    write_report,
)
from cnn_train.flows.reporting.tables import (
    EPOCH_COLUMNS,
    PER_CLASS_COLUMNS,
    ClassificationSummary,
    classification_tables,
    history_frame,
)

__all__ = [
    "COLUMN_FORMATS",
    "COMPARISON_COLUMNS",
    "EPOCH_COLUMNS",
    "PER_CLASS_COLUMNS",
    "ClassificationSummary",
    "ComparisonFiles",
    "ComparisonRow",
    "FigureFiles",
    "Formatter",
    "ReportFiles",
    "ReportInputs",
    "accuracy_gap_points",
    "classification_tables",
    "cnn_against_dense_sentence",
    "comparison_table",
    "confident_mistakes",
    "feature_map_title",
    "format_percent",
    "history_frame",
    "markdown_table",
    "number_format",
    "parity_verdict",
    "percent_format",
    "Predictions",
    "plot_confident_mistakes",
    "plot_confusion_matrix",
    "plot_feature_maps",
    "plot_kernels",
    "plot_learning_curves",
    "plot_predictions_grid",
    "prediction_title",
    "relink_figures",
    "render_report_markdown",
    "run_description",
    "table_records",
    "write_comparison_report",
    "write_report",
]
