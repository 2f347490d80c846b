"""Reports: tables hold the right numbers, figures are real pictures, report.md says what a reader needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnn_train.flows import reporting
from cnn_train.flows.reporting import ComparisonRow, ReportFiles, ReportInputs
from cnn_train.flows.reporting.canvas import mosaic
from cnn_train.plugins.config import FASHION_MNIST_CLASSES, ModelConfig, TrainConfig
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainHistory
from tests.cases import Cases

N_IMAGES = 40
CLASSES = FASHION_MNIST_CLASSES
MLFLOW_URL = "http://127.0.0.1:5000/#/experiments/1/runs/abc123"
PREFECT_URL = "http://127.0.0.1:4200/runs/flow-run/f00"


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
    """Three epochs, the first slowed by warm-up, so the median (13.0 s) and the mean (15.0 s) differ."""
    seconds = {1: 20.0, 2: 12.0, 3: 13.0}
    return TrainHistory(
        epochs=tuple(
            EpochMetrics(
                epoch=e,
                loss=0.6 / e,
                accuracy=0.78 + 0.04 * e,
                val_loss=0.55 / e + 0.05,
                val_accuracy=0.80 + 0.03 * e,
                seconds=seconds[e],
                images_per_second=54_000 / seconds[e],
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
def dense_row() -> ComparisonRow:
    return ComparisonRow("dense (torch)", 0.8843, 101_770, 6.1, 9000.0)


@pytest.fixture(scope="module")
def inputs(history: TrainHistory, dense_row: ComparisonRow) -> ReportInputs:
    return ReportInputs(
        backend="torch",
        model_config=ModelConfig(),
        train_config=TrainConfig(epochs=3),
        history=history,
        test=Evaluation(loss=0.2617, accuracy=0.91234),
        run_name="cnn-torch-demo",
        mlflow_run_url=MLFLOW_URL,
        prefect_flow_run_url=PREFECT_URL,
        dense_baseline=dense_row,
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
    return reporting.write_report(
        inputs,
        tmp_path_factory.mktemp("report"),
        images=images,
        y_true=y_true,
        probabilities=probabilities,
        kernels=rng.normal(size=(3, 3, 1, 32)),
        feature_maps=feature_maps,
    )


@pytest.fixture(scope="module")
def report_text(written: ReportFiles) -> str:
    return written.report_md.read_text()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {},
            "**Test accuracy 91.23%**: Fashion-MNIST CNN, torch backend, 3 epochs at batch 32.\n\n"
            "The CNN reaches 91.23% against 88.43% for the dense network: +2.80 points, with 421,642 parameters "
            "against 101,770.\n\nThe whole report, with tables and figures: `report/report.md` in Artifacts.\n\n"
            f"[Prefect flow run]({PREFECT_URL})",
            id="with-the-dense-network-and-prefect",
        ),
        pytest.param(
            {"dense_baseline": None, "prefect_flow_run_url": None},
            "**Test accuracy 91.23%**: Fashion-MNIST CNN, torch backend, 3 epochs at batch 32.\n\n"
            "The whole report, with tables and figures: `report/report.md` in Artifacts.",
            id="alone-without-a-prefect-ui",
        ),
        pytest.param(
            {"dense_baseline": None, "prefect_flow_run_url": None, "images": {"train": 1800, "validation": 200, "test": 10000}},
            "**Test accuracy 91.23%**: Fashion-MNIST CNN, torch backend, 3 epochs at batch 32 on 1,800 training images, "
            "tested on 10,000.\n\nThe whole report, with tables and figures: `report/report.md` in Artifacts.",
            id="with-its-split-sizes",
        ),
    ],
)
def test_the_runs_mlflow_description_says_the_result_and_where_the_report_is(inputs, changes, expected):
    assert reporting.run_description(dataclasses.replace(inputs, **changes)) == expected


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
FIGURES = Cases()


@FIGURES("learning-curves")
def _learning_curves(path: Path, **data) -> Path:
    return reporting.plot_learning_curves(data["history"], path)


@FIGURES("learning-curves-from-epoch-list")
def _learning_curves_from_list(path: Path, **data) -> Path:
    return reporting.plot_learning_curves(list(data["history"].epochs), path)


@FIGURES("confusion-matrix")
def _confusion(path: Path, **data) -> Path:
    summary = reporting.classification_tables(data["y_true"], data["probabilities"].argmax(1), CLASSES)
    return reporting.plot_confusion_matrix(summary, path)


def _predictions(data: dict) -> reporting.Predictions:
    return reporting.Predictions(data["images"], data["y_true"], data["probabilities"], CLASSES)


@FIGURES("predictions-grid")
def _grid(path: Path, **data) -> Path:
    return reporting.plot_predictions_grid(_predictions(data), path)


@FIGURES("predictions-grid-rgb-partial-row")
def _grid_rgb(path: Path, **data) -> Path:
    rgb = np.repeat(data["images"], 3, axis=-1)
    return reporting.plot_predictions_grid(reporting.Predictions(rgb, data["y_true"], data["probabilities"], CLASSES), path, n=7)


@FIGURES("confident-mistakes")
def _mistakes(path: Path, **data) -> Path:
    return reporting.plot_confident_mistakes(_predictions(data), path)


@FIGURES("confident-mistakes-when-none")
def _no_mistakes(path: Path, **data) -> Path:
    perfect = np.eye(len(CLASSES))[data["y_true"]]
    return reporting.plot_confident_mistakes(reporting.Predictions(data["images"], data["y_true"], perfect, CLASSES), path)


@FIGURES("kernels")
def _kernels(path: Path, **data) -> Path:
    return reporting.plot_kernels(data["rng"].normal(size=(3, 3, 1, 32)), path)


@FIGURES("kernels-rgb-input")
def _kernels_rgb(path: Path, **data) -> Path:
    return reporting.plot_kernels(data["rng"].normal(size=(5, 5, 3, 6)), path)


@FIGURES("feature-maps")
def _feature_maps(path: Path, **data) -> Path:
    return reporting.plot_feature_maps(data["images"][0], data["feature_maps"], path)


@FIGURES("feature-maps-few-channels-unbatched")
def _feature_maps_unbatched(path: Path, **data) -> Path:
    maps = {name: values[0, :, :, :4] for name, values in data["feature_maps"].items()}
    return reporting.plot_feature_maps(data["images"][0], maps, path, max_channels=16)


@pytest.mark.parametrize("draw", FIGURES.params)
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


@pytest.mark.parametrize("epochs", [[1], [1, 2, 3], list(range(1, 41))], ids=["one-epoch", "three", "forty"])
def test_learning_curves_mark_whole_epochs(epochs: list[int]) -> None:
    """A one-epoch run's curves had ticks at 0.96, 0.98, 1.00, 1.02 and 1.04 epochs."""
    from cnn_train.flows.reporting.canvas import new_figure
    from cnn_train.flows.reporting.figures import label_epochs

    ax = new_figure(4, 3).subplots()
    ax.plot(epochs, np.linspace(0.5, 0.6, len(epochs)))
    label_epochs(ax, epochs)
    ticks = [tick for tick in ax.get_xticks() if epochs[0] <= tick <= epochs[-1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    if len(epochs) <= 15:
        assert ticks == epochs


def test_mosaic_places_every_tile_with_gaps_and_caption_bands() -> None:
    tiles = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3)
    tiled = mosaic(tiles, 2, gap=1, band=2)
    assert tiled.pixels.shape == (3 * (2 + 2) + 2 * 1, 2 * 3 + 1)
    for tile, (x, y) in zip(tiles, tiled.origins, strict=True):
        np.testing.assert_array_equal(tiled.pixels[y : y + 2, x : x + 3], tile)
    assert np.isnan(tiled.pixels).sum() == tiled.pixels.size - tiles.size, "gaps and bands are NaN"


@pytest.mark.parametrize(
    ("name", "shape", "title"),
    [
        pytest.param("conv1", (28, 28, 32), "conv1 28x28x32", id="unbatched"),
        pytest.param("pool2", (1, 7, 7, 64), "pool2 7x7x64", id="batch-of-one"),
    ],
)
def test_feature_map_title_names_the_shape(name: str, shape: tuple[int, ...], title: str) -> None:
    assert reporting.feature_map_title(name, shape) == title


def test_feature_maps_refuse_a_batch_of_several(images: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'conv1' must be \(height, width, channels\) or \(1, h, w, c\)"):
        reporting.plot_feature_maps(images[0], {"conv1": np.zeros((2, 28, 28, 32))}, tmp_path / "f.png")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("Sneaker", 0.97, "Sandal"), "Sneaker (97%)\ntrue: Sandal", id="plain"),
        pytest.param(("Shirt", 0.884, "Coat", 0.05), "Shirt (88%)\ntrue: Coat (5%)", id="with-true-probability"),
    ],
)
def test_prediction_title(args: tuple, expected: str) -> None:
    assert reporting.prediction_title(*args) == expected


def test_confident_mistakes_are_ordered_by_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    y_true = np.array([0, 0, 0, 1])
    assert reporting.confident_mistakes(y_true, probabilities, n=10).tolist() == [2, 1, 3]
    assert reporting.confident_mistakes(y_true, probabilities, n=1).tolist() == [2]


@pytest.mark.parametrize(
    ("shrink", "message"),
    [
        pytest.param("images", r"images must be \(n, height, width\[, channels\]\), got shape \(\d+, \d+\)", id="flat-images"),
        pytest.param("y_true", r"must have the same length, got \d+, \d+ and \d+", id="short-labels"),
        pytest.param("probabilities", r"probabilities must be \(n, 10\) to match the class names, got shape \(\d+, 3\)", id="three-classes"),
    ],
)
def test_predictions_refuse_arrays_that_do_not_line_up(
    images: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, shrink: str, message: str
) -> None:
    arrays = {"images": images, "y_true": y_true, "probabilities": probabilities}
    arrays[shrink] = {
        "images": images.reshape(len(images), -1),
        "y_true": y_true[:-1],
        "probabilities": np.full((len(images), 3), 1 / 3),
    }[shrink]
    with pytest.raises(ValueError, match=message):
        reporting.Predictions(**arrays, class_names=CLASSES)


# --------------------------------------------------------------------------- tables


def test_classification_tables_values() -> None:
    names = ("a", "b", "c")
    summary = reporting.classification_tables(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), names)
    assert summary.accuracy == pytest.approx(0.75)
    assert summary.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert summary.confusion_rates.tolist() == [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 0]], "an absent class: zeros"
    assert list(summary.per_class.columns) == list(reporting.PER_CLASS_COLUMNS)
    row = summary.per_class.set_index("class")
    assert row.loc["a"].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 2])
    assert row.loc["b"].tolist() == pytest.approx([2 / 3, 1.0, 0.8, 2])
    assert row.loc["c"].tolist() == [0, 0, 0, 0], "an absent class gets zeros, not NaN"
    averages = summary.averages.set_index("class")
    assert averages.loc["macro avg"].tolist() == pytest.approx([5 / 9, 0.5, (2 / 3 + 0.8) / 3, 4])
    assert averages.loc["weighted avg"].tolist() == pytest.approx([5 / 6, 0.75, (2 / 3 + 0.8) / 2, 4])
    assert list(summary.with_averages()["class"]) == ["a", "b", "c", "macro avg", "weighted avg"]


@pytest.mark.parametrize(
    ("y_pred", "names", "message"),
    [
        pytest.param(
            [0, 2], ("a", "b"), r"y_pred must lie in \[0, 1\] to match 2 class names, got values from 0 to 2",
            id="label-outside-the-classes",
        ),
        pytest.param([0], ("a", "b"), "y_true and y_pred must have the same length, got 2 and 1", id="lengths"),
        pytest.param([0, 1], ("a", "a"), r"class_names must be distinct, got \['a', 'a'\]", id="duplicate-names"),
    ],
)
def test_classification_tables_refuse(y_pred: list[int], names: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reporting.classification_tables(np.array([0, 1]), np.array(y_pred), names)


def test_confusion_rates_rows_sum_to_one(y_true: np.ndarray, probabilities: np.ndarray) -> None:
    summary = reporting.classification_tables(y_true, probabilities.argmax(1), CLASSES)
    np.testing.assert_allclose(summary.confusion_rates.sum(axis=1), 1.0)


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
    text = reporting.parity_verdict(accuracies, tolerance_points=1.0)
    assert text.startswith(verdict)
    assert "torch 91.20%" in text


@pytest.mark.parametrize(
    ("accuracies", "verdict"),
    [
        pytest.param(  # two models answering one class each were "parity: max gap 0.00 points"
            {"torch": 0.1, "keras": 0.1},
            "no verdict: every backend is at chance level (10.00% for 10 classes): learnt nothing (torch 10.00%, keras 10.00%)",
            id="both-guess",
        ),
        pytest.param(
            {"torch": 0.85, "keras": 0.115},
            "no parity: max gap 73.50 points > 1 (torch 85.00%, keras 11.50%); keras at chance level (10.00% for 10 "
            "classes): learnt nothing",
            id="one-guesses",
        ),
    ],
)
def test_a_backend_at_chance_level_is_named_so(accuracies: dict[str, float], verdict: str) -> None:
    assert reporting.parity_verdict(accuracies, tolerance_points=1.0) == verdict


@pytest.mark.parametrize(
    ("accuracies", "message"),
    [
        pytest.param({"torch": 0.9}, "need at least two accuracies", id="single"),
        pytest.param({"torch": 91.2, "keras": 90.8}, "must be a fraction in", id="percent-not-fraction"),
    ],
)
def test_parity_verdict_refuses(accuracies: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reporting.parity_verdict(accuracies)


def test_comparison_table_accepts_rows_and_mappings() -> None:
    frame = reporting.comparison_table(
        [ComparisonRow("cnn", 0.912, 421_642, 12.5, 4800.0), {"name": "dense", "test_accuracy": 0.884}]
    )
    assert list(frame.columns) == list(reporting.COMPARISON_COLUMNS)
    assert frame["parameters"].tolist()[0] == 421_642
    assert pd.isna(frame.loc[1, "seconds_per_epoch"])
    table = reporting.markdown_table(frame)
    assert "| cnn | 91.20% | 421,642 | 12.5 | 4,800 |" in table
    assert "| dense | 88.40% | n/a | n/a | n/a |" in table


def test_comparison_table_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['acc'\]; allowed: name, test_accuracy"):
        reporting.comparison_table([{"name": "cnn", "test_accuracy": 0.9, "acc": 0.9}])


def test_comparison_row_of_a_history_takes_its_median_speed(history: TrainHistory) -> None:
    row = ComparisonRow.of("cnn (torch)", history, 0.91, 421_642)
    assert row == ComparisonRow("cnn (torch)", 0.91, 421_642, 13.0, 54_000 / 13.0)


# --------------------------------------------------------------------------- markdown numbers


@pytest.mark.parametrize(
    ("column", "value", "cell"),
    [
        pytest.param("test_accuracy", 0.79713525390625, "79.71%", id="test-accuracy-percent"),
        pytest.param("val_accuracy", 0.9, "90.00%", id="val-accuracy-percent"),
        pytest.param("accuracy", 0.8125, "81.25%", id="accuracy-percent"),
        pytest.param("seconds_per_epoch", 13.0449, "13.0", id="seconds-per-epoch-one-decimal"),
        pytest.param("seconds", 9.96, "10.0", id="seconds-one-decimal"),
        pytest.param("images_per_second", 4153.846, "4,154", id="throughput-whole-with-separators"),
        pytest.param("test_loss", 0.261749, "0.2617", id="loss-four-decimals"),
        pytest.param("parameters", 421642, "421,642", id="parameters-separators"),
        pytest.param("f1", 2 / 3, "0.667", id="f1-three-decimals"),
        pytest.param("learning_rate", 0.0003, "0.0003", id="unknown-float-plain"),
        pytest.param("test_accuracy", float("nan"), "n/a", id="missing"),
    ],
)
def test_markdown_table_formats_well_known_columns(column: str, value: object, cell: str) -> None:
    table = reporting.markdown_table(pd.DataFrame({column: [value]}))
    assert table.splitlines()[-1] == f"| {cell} |"


def test_markdown_table_takes_formats_per_column() -> None:
    frame = pd.DataFrame({"test_accuracy": [0.5], "ratio": [0.123456]})
    table = reporting.markdown_table(frame, {"ratio": reporting.percent_format})
    assert table.splitlines()[-1] == "| 50.00% | 12.35% |"


def test_sweep_ranking_reads_as_human_numbers() -> None:
    ranking = pd.DataFrame(
        {
            "rank": [1, 2],
            "learning_rate": [0.001, 0.003],
            "test_accuracy": [0.79713525390625, 0.7812],
            "test_loss": [0.5612345, 0.6],
            "seconds_per_epoch": [13.04, 12.96],
            "run_id": ["abc", "def"],
        }
    )
    lines = reporting.markdown_table(ranking).splitlines()
    assert lines[0] == "| rank | learning rate | test accuracy | test loss | seconds per epoch | run id |"
    assert lines[2] == "| 1 | 0.001 | 79.71% | 0.5612 | 13.0 | abc |"


def test_table_records_carry_the_markdown_numbers() -> None:
    frame = reporting.comparison_table([ComparisonRow("cnn", 0.912, 421_642, 12.5, 4800.0), ComparisonRow("d", 0.9)])
    assert reporting.table_records(frame) == [
        {
            "name": "cnn",
            "test_accuracy": "91.20%",
            "parameters": "421,642",
            "seconds_per_epoch": "12.5",
            "images_per_second": "4,800",
        },
        {"name": "d", "test_accuracy": "90.00%"} | dict.fromkeys(reporting.COMPARISON_COLUMNS[2:], "n/a"),
    ]


def test_markdown_table_aligns_numbers_and_escapes_pipes() -> None:
    table = reporting.markdown_table(pd.DataFrame({"name": ["a|b"], "value": [1.5]}))
    assert table.splitlines() == ["| name | value |", "| :--- | ---: |", r"| a\|b | 1.5 |"]


# --------------------------------------------------------------------------- report


def test_per_class_csv_keeps_raw_values(written: ReportFiles) -> None:
    frame = pd.read_csv(written.per_class_csv)
    assert list(frame.columns) == list(reporting.PER_CLASS_COLUMNS)
    assert frame["class"].tolist() == list(CLASSES)
    assert frame["support"].sum() == N_IMAGES
    epochs = pd.read_csv(written.epochs_csv)
    assert epochs["images_per_second"].tolist() == pytest.approx([2700.0, 4500.0, 54_000 / 13])


def test_the_reports_parameters_give_the_split_sizes(inputs: ReportInputs, history: TrainHistory) -> None:
    """A run on 1,800 images read like one on all of them: only the data.train param said how many."""
    sized = dataclasses.replace(inputs, images={"train": 1800, "validation": 200, "test": 500})
    summary = reporting.classification_tables(np.arange(10), np.arange(10), CLASSES)
    text = reporting.render_report_markdown(sized, summary)
    assert "| train images | 1,800 |\n| validation images | 200 |\n| test images | 500 |" in text
    assert "train images" not in reporting.render_report_markdown(inputs, summary)


def test_report_states_metrics_links_and_tables(report_text: str) -> None:
    assert report_text.startswith("# Fashion-MNIST CNN, torch backend")
    assert "| test accuracy | 91.23% (0.9123) |" in report_text
    assert "| test loss | 0.2617 |" in report_text
    assert "| epochs | 3 |" in report_text
    assert f"[MLflow run]({MLFLOW_URL}) · [Prefect flow run]({PREFECT_URL})" in report_text
    for name in CLASSES:
        assert f"| {name} | " in report_text
    assert "| macro avg | " in report_text
    assert "| 3 | 0.2000 | 90.00% | 0.2333 | 89.00% | 13.0 | 4,154 |" in report_text


def test_report_and_comparison_table_carry_the_same_speed(
    report_text: str, inputs: ReportInputs, dense_row: ComparisonRow
) -> None:
    table = reporting.comparison_table([inputs.as_comparison_row("CNN (torch)"), dense_row])
    assert table.loc[0, "seconds_per_epoch"] == inputs.history.seconds_per_epoch == 13.0
    assert table.loc[0, "images_per_second"] == inputs.history.images_per_second
    assert "| seconds per epoch, validation included (median of 3) | 13.0 |" in report_text
    assert "| training images per second (median of 3) | 4,154 |" in report_text
    assert "| CNN (torch) | 91.23% | 421,642 | 13.0 | 4,154 |" in report_text


def test_report_links_figures_beside_it(written: ReportFiles, report_text: str) -> None:
    for path in written.figures.paths():
        assert f"]({path.name})" in report_text
        assert path.parent == written.report_md.parent


def test_report_states_the_cnn_gain_over_dense(report_text: str) -> None:
    assert (
        "The CNN reaches 91.23% against 88.43% for the dense network: +2.80 points, "
        "with 421,642 parameters against 101,770." in report_text
    )


def _render(history: TrainHistory, y_true: np.ndarray, **links: str | None) -> str:
    inputs = ReportInputs(
        backend="keras",
        model_config=ModelConfig.preset("dense"),
        train_config=TrainConfig(),
        history=history,
        test=Evaluation(loss=0.33, accuracy=0.8843),
        **links,
    )
    return reporting.render_report_markdown(inputs, reporting.classification_tables(y_true, y_true, CLASSES))


HINT = "run `cnn-train up` and open http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("links", "present", "absent"),
    [
        pytest.param(
            {"mlflow_run_url": MLFLOW_URL, "mlflow_open_hint": HINT},
            [f"[MLflow run]({MLFLOW_URL})"],
            [HINT, "Prefect flow run"],
            id="mlflow-link-wins-over-hint",
        ),
        pytest.param(
            {"mlflow_open_hint": HINT, "prefect_flow_run_url": PREFECT_URL},
            [f"[Prefect flow run]({PREFECT_URL})", f"MLflow run: {HINT}"],
            ["[MLflow run]"],
            id="no-mlflow-server-prints-the-hint",
        ),
        pytest.param({}, [], ["MLflow run", "Prefect flow run"], id="neither"),
    ],
)
def test_report_links_work_or_are_absent(
    history: TrainHistory, y_true: np.ndarray, links: dict, present: list[str], absent: list[str]
) -> None:
    text = _render(history, y_true, **links)
    for snippet in present:
        assert snippet in text
    for snippet in [*absent, "None/", "sqlite:", "](None"]:
        assert snippet not in text


@pytest.mark.parametrize(
    ("field", "url"),
    [
        pytest.param("mlflow_run_url", "sqlite:///home/me/mlflow.db (experiment 1, run abc)", id="mlflow-sqlite"),
        pytest.param("prefect_flow_run_url", "None/flow-runs/flow-run/f00", id="prefect-without-ui-url"),
    ],
)
def test_report_refuses_links_a_browser_cannot_open(history: TrainHistory, field: str, url: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be an http\\(s\\) URL .* pass None when there is no web UI"):
        ReportInputs(
            backend="torch",
            model_config=ModelConfig(),
            train_config=TrainConfig(),
            history=history,
            test=Evaluation(loss=0.3, accuracy=0.9),
            **{field: url},
        )


def test_report_without_optional_parts(history: TrainHistory, y_true: np.ndarray) -> None:
    text = _render(history, y_true)
    assert text.startswith("# Fashion-MNIST dense network, keras backend")
    assert "| trainable parameters | 101,770 |" in text
    assert "CNN reaches" not in text and "![" not in text


@pytest.mark.parametrize("architecture", ["cnn", "cnn-improved", "dense"])
def test_dense_baseline_only_for_a_cnn(history: TrainHistory, y_true: np.ndarray, architecture: str) -> None:
    def inputs() -> ReportInputs:
        return ReportInputs(
            backend="torch",
            model_config=ModelConfig.preset(architecture),
            train_config=TrainConfig(),
            history=history,
            test=Evaluation(loss=0.3, accuracy=0.93),
            dense_baseline=ComparisonRow("dense network", 0.88, parameters=101_770),
        )

    if architecture == "dense":
        with pytest.raises(ValueError, match="this run's network is the dense one; leave dense_baseline unset"):
            inputs()
    else:
        text = reporting.render_report_markdown(inputs(), reporting.classification_tables(y_true, y_true, CLASSES))
        assert "## CNN against dense network" in text and "The CNN reaches 93.00% against 88.00%" in text


# --------------------------------------------------------------------------- comparison report


@pytest.fixture(scope="module")
def backend_rows() -> list[ComparisonRow]:
    return [ComparisonRow("keras", 0.912, 421_642, 22.0, 2900.0), ComparisonRow("torch", 0.918, 421_642, 16.0, 3900.0)]


@pytest.fixture(scope="module")
def summaries(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, reporting.ClassificationSummary]:
    predicted = probabilities.argmax(1)
    return {
        "keras": reporting.classification_tables(y_true, predicted, CLASSES),
        "torch": reporting.classification_tables(y_true, y_true, CLASSES),
    }


def test_comparison_report_side_by_side(backend_rows, summaries, tmp_path: Path) -> None:
    files = reporting.write_comparison_report(
        backend_rows, summaries, tmp_path, title="keras against torch", links={"MLflow parent run": MLFLOW_URL}
    )
    text = files.report_md.read_text()
    assert f"[MLflow parent run]({MLFLOW_URL})" in text
    assert "| keras | 91.20% | 421,642 | 22.0 | 2,900 |" in text
    assert "**Verdict**: parity: max gap 0.60 points <= 1" in text
    assert [p.name for p in files.confusion_matrices] == ["confusion_matrix_keras.png", "confusion_matrix_torch.png"]
    for path in files.confusion_matrices:
        assert_real_png(path)
    assert len(files.table_csv.read_text().splitlines()) == 3


def test_comparison_report_without_a_web_ui_prints_the_hint(backend_rows, summaries, tmp_path: Path) -> None:
    files = reporting.write_comparison_report(
        backend_rows, summaries, tmp_path, title="t", links={"MLflow parent run": None}, open_hint=HINT
    )
    text = files.report_md.read_text()
    assert HINT in text and "MLflow parent run" not in text and "None" not in text


@pytest.mark.parametrize(
    ("links", "summary_names", "message"),
    [
        pytest.param(
            {"MLflow parent run": "sqlite:///mlflow.db"}, ("keras", "torch"),
            "the MLflow parent run link must be an http\\(s\\) URL", id="sqlite-link",
        ),
        pytest.param({}, ("keras",), r"no classification summary for \['torch'\]", id="missing-summary"),
    ],
)
def test_comparison_report_refuses(backend_rows, summaries, tmp_path, links, summary_names, message) -> None:
    with pytest.raises(ValueError, match=message):
        reporting.write_comparison_report(
            backend_rows, {name: summaries[name] for name in summary_names}, tmp_path, title="t", links=links
        )


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        pytest.param("http://127.0.0.1:5123", "![CM](http://127.0.0.1:5123/get-artifact?path=compare/confusion_matrix_torch.png&run_uuid=r1)",
                     id="server-serves-them"),
        pytest.param("sqlite:///mlflow.db", "![CM](confusion_matrix_torch.png)", id="no-server-left-as-is"),
    ],
)
def test_a_reports_figures_come_from_the_mlflow_server(uri, expected, tmp_path) -> None:
    """In the Prefect UI, which has no files beside the report, and in MLflow's own preview of the logged
    report.md, which showed every figure as the text of its link: it draws images at absolute addresses only."""
    from cnn_train.flows.runs import figures_from_mlflow

    report = tmp_path / "compare.md"
    report.write_text("# Title\n\n![CM](confusion_matrix_torch.png)\n[MLflow run](http://x/#/runs/1)\n")
    out = figures_from_mlflow(report, uri, "r1", "compare")
    assert expected in out and "[MLflow run](http://x/#/runs/1)" in out
    assert report.read_text() == out  # the copy MLflow keeps


def test_relink_figures_rewrites_only_figure_links() -> None:
    markdown = "![Curves](learning_curves.png)\n[MLflow run](http://x/#/runs/1)\n![CM](confusion_matrix.png)\n"
    out = reporting.relink_figures(markdown, lambda name: f"http://mlflow/get-artifact?path=report/{name}")
    assert "![Curves](http://mlflow/get-artifact?path=report/learning_curves.png)" in out
    assert "![CM](http://mlflow/get-artifact?path=report/confusion_matrix.png)" in out
    assert "[MLflow run](http://x/#/runs/1)" in out


@pytest.mark.parametrize(("whose", "title"), [(None, "Confusion matrix (6 images)"), ("keras", "keras: Confusion matrix (6 images)")],
                         ids=["a-run", "a-compared-backend"])
def test_a_confusion_matrix_says_whose_it_is(monkeypatch, tmp_path, whose, title):
    """compare's two pictures had one title, 'Confusion matrix (1,000 images)': apart from their file names, alike."""
    from cnn_train.flows.reporting import figures

    titles = []
    saved = figures.save
    monkeypatch.setattr(figures, "save", lambda figure, path: titles.append(figure._suptitle.get_text()) or saved(figure, path))
    summary = reporting.classification_tables(np.array([0, 1, 2, 0, 1, 2]), np.array([0, 1, 1, 0, 2, 2]), ("a", "b", "c"))
    figures.plot_confusion_matrix(summary, tmp_path / "matrix.png", whose=whose)
    assert titles == [title]
