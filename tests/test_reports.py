"""Reports: tables hold the right numbers, figures are real pictures, report.md says what a reader needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnn_train.flows import reports
from cnn_train.flows.reports import ComparisonRow, ReportFiles, ReportInputs
from cnn_train.plugins.config import FASHION_MNIST_CLASSES, ModelConfig, TrainConfig
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainHistory

N_IMAGES = 40
CLASSES = FASHION_MNIST_CLASSES


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def images(rng: np.random.Generator) -> np.ndarray:
    """Bright rectangles on a dark background, one per image, so pictures are not blank."""
    x = np.zeros((N_IMAGES, 28, 28, 1), dtype=np.float32)
    for image in x:
        top, left = rng.integers(2, 12, size=2)
        height, width = rng.integers(8, 15, size=2)
        image[top : top + height, left : left + width, 0] = rng.uniform(0.5, 1.0)
    return x


@pytest.fixture(scope="module")
def y_true() -> np.ndarray:
    return np.arange(N_IMAGES, dtype=np.int64) % len(CLASSES)


@pytest.fixture(scope="module")
def probabilities(rng: np.random.Generator, y_true: np.ndarray) -> np.ndarray:
    """Mostly right, with every fourth image confidently wrong."""
    logits = rng.normal(size=(N_IMAGES, len(CLASSES)))
    logits[np.arange(N_IMAGES), y_true] += 4.0
    wrong = np.arange(0, N_IMAGES, 4)
    logits[wrong, (y_true[wrong] + 1) % len(CLASSES)] += 8.0
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def history() -> TrainHistory:
    return TrainHistory(
        epochs=tuple(
            EpochMetrics(
                epoch=e,
                loss=0.6 / e,
                accuracy=0.78 + 0.04 * e,
                val_loss=0.55 / e + 0.05,
                val_accuracy=0.80 + 0.03 * e,
                seconds=12.0 + e,
                images_per_second=4000.0 + 100 * e,
            )
            for e in (1, 2, 3)
        )
    )


@pytest.fixture(scope="module")
def feature_maps(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        name: rng.random((1, *shape)).astype(np.float32) for name, shape in ModelConfig().feature_map_shapes()
    }


@pytest.fixture(scope="module")
def inputs(history: TrainHistory) -> ReportInputs:
    return ReportInputs(
        backend="torch",
        model_config=ModelConfig(),
        train_config=TrainConfig(epochs=3),
        history=history,
        test=Evaluation(loss=0.2617, accuracy=0.91234),
        device="cpu",
        run_name="cnn-torch-demo",
        mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc123",
        prefect_flow_run_url="http://127.0.0.1:4200/runs/flow-run/f00",
        dense_baseline=ComparisonRow("dense (torch)", 0.8843, 101_770, 6.1, 9000.0),
        other_backends=(ComparisonRow("keras", 0.9085, 421_642, 15.2, 3500.0),),
    )


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory,
    inputs: ReportInputs,
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    feature_maps: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> ReportFiles:
    return reports.write_report(
        inputs,
        tmp_path_factory.mktemp("report"),
        images=images,
        y_true=y_true,
        probabilities=probabilities,
        kernels=rng.normal(size=(3, 3, 1, 32)),
        feature_maps=feature_maps,
    )


def assert_real_png(path: Path) -> None:
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        pixels = np.asarray(picture.convert("L"), dtype=float) / 255
    assert width >= 300 and height >= 300, f"{path.name} is only {width}x{height}"
    assert pixels.std() > 0.05, f"{path.name} looks blank (pixel std {pixels.std():.3f})"


# --------------------------------------------------------------------------- figures

FigureCase = Callable[..., Path]


def _learning_curves(path: Path, **data) -> Path:
    return reports.plot_learning_curves(data["history"], path)


def _learning_curves_from_list(path: Path, **data) -> Path:
    return reports.plot_learning_curves(list(data["history"].epochs), path)


def _confusion(path: Path, **data) -> Path:
    counts = reports.classification_tables(data["y_true"], data["probabilities"].argmax(1), CLASSES).confusion
    return reports.plot_confusion_matrix(counts, CLASSES, path)


def _grid(path: Path, **data) -> Path:
    return reports.plot_predictions_grid(data["images"], data["y_true"], data["probabilities"], CLASSES, path)


def _mistakes(path: Path, **data) -> Path:
    return reports.plot_confident_mistakes(data["images"], data["y_true"], data["probabilities"], CLASSES, path)


def _no_mistakes(path: Path, **data) -> Path:
    perfect = np.eye(len(CLASSES))[data["y_true"]]
    return reports.plot_confident_mistakes(data["images"], data["y_true"], perfect, CLASSES, path)


def _kernels(path: Path, **data) -> Path:
    return reports.plot_kernels(data["rng"].normal(size=(3, 3, 1, 32)), path)


def _kernels_rgb(path: Path, **data) -> Path:
    return reports.plot_kernels(data["rng"].normal(size=(5, 5, 3, 6)), path)


def _feature_maps(path: Path, **data) -> Path:
    return reports.plot_feature_maps(data["images"][0], data["feature_maps"], path)


def _feature_maps_unbatched(path: Path, **data) -> Path:
    maps = {name: values[0, :, :, :4] for name, values in data["feature_maps"].items()}
    return reports.plot_feature_maps(data["images"][0], maps, path, max_channels=16)


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(_learning_curves, id="learning-curves"),
        pytest.param(_learning_curves_from_list, id="learning-curves-from-epoch-list"),
        pytest.param(_confusion, id="confusion-matrix"),
        pytest.param(_grid, id="predictions-grid"),
        pytest.param(_mistakes, id="confident-mistakes"),
        pytest.param(_no_mistakes, id="confident-mistakes-when-none"),
        pytest.param(_kernels, id="kernels"),
        pytest.param(_kernels_rgb, id="kernels-rgb-input"),
        pytest.param(_feature_maps, id="feature-maps"),
        pytest.param(_feature_maps_unbatched, id="feature-maps-few-channels-unbatched"),
    ],
)
def test_figure_is_a_real_picture(
    draw: FigureCase, tmp_path: Path, images, y_true, probabilities, history, feature_maps, rng
) -> None:
    path = tmp_path / "nested" / "figure.png"
    returned = draw(
        path,
        images=images,
        y_true=y_true,
        probabilities=probabilities,
        history=history,
        feature_maps=feature_maps,
        rng=rng,
    )
    assert returned == path
    assert_real_png(path)


def test_written_figures_are_real_pictures(written: ReportFiles) -> None:
    assert len(written.figures.paths()) == 6
    for path in written.figures.paths():
        assert_real_png(path)


@pytest.mark.parametrize(
    ("name", "shape", "title"),
    [
        pytest.param("conv1", (28, 28, 32), "conv1 28x28x32", id="unbatched"),
        pytest.param("pool2", (1, 7, 7, 64), "pool2 7x7x64", id="batch-of-one"),
    ],
)
def test_feature_map_title_names_the_shape(name: str, shape: tuple[int, ...], title: str) -> None:
    assert reports.feature_map_title(name, shape) == title


def test_feature_maps_refuse_a_batch_of_several(images: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'conv1' must be \(height, width, channels\) or \(1, h, w, c\)"):
        reports.plot_feature_maps(images[0], {"conv1": np.zeros((2, 28, 28, 32))}, tmp_path / "f.png")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("Sneaker", 0.97, "Sandal"), "Sneaker (97%)\ntrue: Sandal", id="plain"),
        pytest.param(("Shirt", 0.884, "Coat", 0.05), "Shirt (88%)\ntrue: Coat (5%)", id="with-true-probability"),
    ],
)
def test_prediction_title(args: tuple, expected: str) -> None:
    assert reports.prediction_title(*args) == expected


def test_confident_mistakes_are_ordered_by_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    y_true = np.array([0, 0, 0, 1])
    assert reports.confident_mistakes(y_true, probabilities, n=10).tolist() == [2, 1, 3]
    assert reports.confident_mistakes(y_true, probabilities, n=1).tolist() == [2]


def test_predictions_refuse_mismatched_probabilities(images: np.ndarray, y_true: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"probabilities must be \(n, 10\)"):
        reports.plot_predictions_grid(images, y_true, np.full((N_IMAGES, 3), 1 / 3), CLASSES, tmp_path / "g.png")


# --------------------------------------------------------------------------- tables


def test_classification_tables_values() -> None:
    names = ("a", "b", "c")
    summary = reports.classification_tables(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), names)
    assert summary.accuracy == pytest.approx(0.75)
    assert summary.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    row = summary.per_class.set_index("class")
    assert row.loc["a"].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 2])
    assert row.loc["b"].tolist() == pytest.approx([2 / 3, 1.0, 0.8, 2])
    assert row.loc["c"].tolist() == [0, 0, 0, 0], "an absent class gets zeros, not NaN"
    averages = summary.averages.set_index("class")
    assert averages.loc["macro avg", "recall"] == pytest.approx(0.5)
    assert averages.loc["weighted avg", "recall"] == pytest.approx(0.75)
    assert list(summary.with_averages()["class"]) == ["a", "b", "c", "macro avg", "weighted avg"]


def test_classification_tables_refuse_labels_outside_the_classes() -> None:
    message = r"y_pred must lie in \[0, 1\] to match 2 class names, got values from 0 to 2"
    with pytest.raises(ValueError, match=message):
        reports.classification_tables(np.array([0, 1]), np.array([0, 2]), ("a", "b"))


def test_normalised_confusion_rows_sum_to_one(y_true: np.ndarray, probabilities: np.ndarray) -> None:
    summary = reports.classification_tables(y_true, probabilities.argmax(1), CLASSES)
    np.testing.assert_allclose(summary.confusion_normalised.sum(axis=1), 1.0)
    assert reports.normalise_rows(np.array([[0, 0], [1, 3]])).tolist() == [[0, 0], [0.25, 0.75]]


@pytest.mark.parametrize(
    ("accuracies", "verdict"),
    [
        pytest.param({"torch": 0.912, "keras": 0.908}, "parity: max gap 0.40 points <= 1", id="parity"),
        pytest.param({"torch": 0.912, "keras": 0.902}, "parity: max gap 1.00 points <= 1", id="gap-equal-tolerance"),
        pytest.param(
            {"torch": 0.912, "keras": 0.891, "jax": 0.905}, "no parity: max gap 2.10 points > 1", id="no-parity"
        ),
    ],
)
def test_parity_verdict(accuracies: dict[str, float], verdict: str) -> None:
    text = reports.parity_verdict(accuracies, tolerance_points=1.0)
    assert text.startswith(verdict)
    assert "torch 91.20%" in text


@pytest.mark.parametrize(
    ("accuracies", "message"),
    [
        pytest.param({"torch": 0.9}, "need at least two accuracies", id="single"),
        pytest.param({"torch": 91.2, "keras": 90.8}, "must be a fraction in", id="percent-not-fraction"),
    ],
)
def test_parity_verdict_refuses(accuracies: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reports.parity_verdict(accuracies)


def test_comparison_table_accepts_rows_and_mappings() -> None:
    frame = reports.comparison_table(
        [ComparisonRow("cnn", 0.912, 421_642, 12.5, 4800.0), {"name": "dense", "test_accuracy": 0.884}]
    )
    assert list(frame.columns) == list(reports.COMPARISON_COLUMNS)
    assert frame["parameters"].tolist()[0] == 421_642
    assert pd.isna(frame.loc[1, "seconds_per_epoch"])
    table = reports.markdown_table(frame, reports.COMPARISON_FORMATS)
    assert "| cnn | 91.20% | 421,642 | 12.5 | 4,800 |" in table
    assert "| dense | 88.40% | n/a | n/a | n/a |" in table


def test_comparison_table_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['acc'\]"):
        reports.comparison_table([{"name": "cnn", "test_accuracy": 0.9, "acc": 0.9}])


def test_markdown_table_aligns_numbers_and_escapes_pipes() -> None:
    table = reports.markdown_table(pd.DataFrame({"name": ["a|b"], "value": [1.5]}))
    assert table.splitlines() == ["| name | value |", "| :--- | ---: |", r"| a\|b | 1.5 |"]


# --------------------------------------------------------------------------- report


def test_per_class_csv_has_one_row_per_class(written: ReportFiles) -> None:
    frame = pd.read_csv(written.per_class_csv)
    assert list(frame.columns) == list(reports.PER_CLASS_COLUMNS)
    assert frame["class"].tolist() == list(CLASSES)
    assert frame["support"].sum() == N_IMAGES
    assert len(pd.read_csv(written.epochs_csv)) == 3


def test_report_states_metrics_links_and_tables(written: ReportFiles) -> None:
    text = written.report_md.read_text()
    assert text.startswith("# Fashion-MNIST CNN, torch backend")
    assert "| test accuracy | 91.23% (0.9123) |" in text
    assert "| test loss | 0.2617 |" in text
    assert "| epochs | 3 |" in text
    assert "| seconds per epoch | 14.0 |" in text
    assert "[MLflow run](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in text
    assert "[Prefect flow run](http://127.0.0.1:4200/runs/flow-run/f00)" in text
    for name in CLASSES:
        assert f"| {name} | " in text
    assert "| macro avg | " in text
    assert "| 3 | 0.2000 | 90.00% | 0.2333 | 89.00% | 15.0 | 4,300 |" in text
    assert "Verdict: parity: max gap 0.38 points <= 1" in text


def test_report_links_figures_beside_it(written: ReportFiles) -> None:
    text = written.report_md.read_text()
    for path in written.figures.paths():
        assert f"]({path.name})" in text
        assert path.parent == written.report_md.parent


def test_report_states_the_cnn_gain_over_dense(written: ReportFiles) -> None:
    assert (
        "The CNN reaches 91.23% against 88.43% for the dense network: +2.80 points, "
        "with 421,642 parameters against 101,770." in written.report_md.read_text()
    )


def test_report_without_optional_parts(history: TrainHistory, y_true: np.ndarray) -> None:
    inputs = ReportInputs(
        backend="keras",
        model_config=ModelConfig.preset("dense"),
        train_config=TrainConfig(),
        history=history,
        test=Evaluation(loss=0.33, accuracy=0.8843),
    )
    text = reports.render_report_markdown(inputs, reports.classification_tables(y_true, y_true, CLASSES))
    assert text.startswith("# Fashion-MNIST dense network, keras backend")
    assert "| trainable parameters | 101,770 |" in text
    assert "CNN reaches" not in text and "Verdict" not in text
    assert "MLflow run" not in text and "![" not in text


def test_dense_baseline_only_for_a_cnn(history: TrainHistory) -> None:
    with pytest.raises(ValueError, match="this run's architecture is 'dense'"):
        ReportInputs(
            backend="torch",
            model_config=ModelConfig.preset("dense"),
            train_config=TrainConfig(),
            history=history,
            test=Evaluation(loss=0.3, accuracy=0.88),
            dense_baseline=ComparisonRow("dense", 0.88),
        )


def test_comparison_report_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    confusions = {name: rng.integers(0, 50, size=(10, 10)) for name in ("keras", "torch")}
    rows = [
        reports.ComparisonRow("keras", 0.912, 421_642, 22.0, 2900.0),
        reports.ComparisonRow("torch", 0.918, 421_642, 16.0, 3900.0),
    ]
    files = reports.write_comparison_report(rows, confusions, tmp_path, title="keras against torch")
    text = files.report_md.read_text()
    assert "| keras |" in text.replace("  ", " ") or "keras" in text
    assert "parity: max gap 0.60 points <= 1" in text
    assert [p.name for p in files.confusion_matrices] == ["confusion_matrix_keras.png", "confusion_matrix_torch.png"]
    assert all(p.stat().st_size > 10_000 for p in files.confusion_matrices)
    assert len(files.table_csv.read_text().splitlines()) == 3


def test_relink_figures_rewrites_only_figure_links():
    markdown = "![Curves](learning_curves.png)\n[MLflow run](http://x/#/runs/1)\n![CM](confusion_matrix.png)\n"
    out = reports.relink_figures(markdown, lambda name: f"http://mlflow/get-artifact?path=report/{name}")
    assert "![Curves](http://mlflow/get-artifact?path=report/learning_curves.png)" in out
    assert "![CM](http://mlflow/get-artifact?path=report/confusion_matrix.png)" in out
    assert "[MLflow run](http://x/#/runs/1)" in out
