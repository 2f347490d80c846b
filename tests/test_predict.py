"""From a trained model to predictions: image files brought to Fashion-MNIST's form, `cnn-train predict`,
the `cnn-train-predict` flow, and the champion served over REST by `mlflow models serve`.

The images are real Fashion-MNIST test images written out as PNG and JPEG at other sizes, in colour,
inverted (light background), on a wide canvas and cut out on transparency; the model is a small real
one trained through the `cnn-train` flow and registered (so it is the champion) in a private store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnn_train.flows import predict, tracking
from cnn_train.flows.data import TEST_IMAGES, TEST_LABELS
from cnn_train.flows.data.idx import read_idx
from cnn_train.flows.predict.predict import read_inputs
from cnn_train.plugins.config import FASHION_MNIST_CLASSES
from tests.fashion_photos import LARGE_PHOTOS, PIXEL_FORMATS, VARIANTS
from tests.local_stack import free_port

BIN = Path(sys.executable).parent
MODEL_NAME = "fashion-predict-test"
#: Two test images of each class: the exported set the acceptance test classifies.
PER_CLASS = 2


def _test_set(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(folder / TEST_IMAGES.name, TEST_IMAGES, verify_checksum=False).array
    labels = read_idx(folder / TEST_LABELS.name, TEST_LABELS, verify_checksum=False).array
    return images, labels


def _shift_tolerant_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of ``a`` with ``b`` moved by at most one pixel either way: centring a
    garment on 28x28 may land it a pixel off, as Fashion-MNIST's own centring did."""
    best = -1.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            moved = np.roll(np.roll(b, dy, axis=0), dx, axis=1)
            best = max(best, float(np.corrcoef(a.ravel(), moved.ravel())[0, 1]))
    return best


@pytest.fixture(scope="module")
def test_set(real_fashion_mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return _test_set(real_fashion_mnist_dir)


@pytest.mark.parametrize("variant", [*VARIANTS, *PIXEL_FORMATS, *LARGE_PHOTOS])
def test_an_exported_image_comes_back_as_fashion_mnist_made_it(variant, test_set, tmp_path):
    images, _ = test_set
    original = images[0]  # an ankle boot
    path = {**VARIANTS, **PIXEL_FORMATS, **LARGE_PHOTOS}[variant](original, tmp_path / "boot")
    item = predict.load_model_input(path)
    assert item.pixels.shape == (28, 28, 1) and item.pixels.dtype == np.float32
    assert item.pixels.min() == 0.0 and item.pixels.max() == 1.0
    assert item.inverted == variant.startswith(("inverted", "cut-out"))
    assert _shift_tolerant_correlation(item.pixels[..., 0], original / 255.0) > 0.9


@pytest.mark.parametrize(
    ("classified", "failed", "line"),
    [
        pytest.param(1, 1, "1 image classified, 1 failed", id="one"),
        pytest.param(0, 2, "0 images classified, 2 failed", id="none"),
        pytest.param(20, 0, "20 images classified, 0 failed", id="many"),
    ],
)
def test_the_summary_counts_in_english(classified, failed, line):
    assert predict.counted(classified, failed) == line


def test_a_picture_over_pillows_pixel_limit_is_read_without_its_warning(test_set, tmp_path, monkeypatch):
    # Between the limit and twice it Pillow warns (a raw line on stderr among cnn-train's) and decodes.
    path = LARGE_PHOTOS["inverted-phone-photo-jpeg"](test_set[0][0], tmp_path / "boot")  # 6 megapixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict.load_model_input(path).pixels.max() == 1.0


def test_a_blank_picture_is_an_empty_input():
    pixels, inverted = predict.to_model_input(np.full((40, 60), 255.0))
    assert inverted and not pixels.any()


def _grey_with_noise(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(-4, 5, size=(64, 64))
    Image.fromarray((120 + noise).astype(np.uint8)).save(path, quality=75)
    return path


@pytest.mark.parametrize(
    ("name", "write"),
    [
        pytest.param("white.png", lambda p: Image.new("RGB", (1, 1), "white").save(p), id="one-white-pixel"),
        pytest.param("black.png", lambda p: Image.new("L", (50, 50), 0).save(p), id="black"),
        pytest.param("clear.png", lambda p: Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(p), id="transparent"),
        pytest.param("grey.jpg", _grey_with_noise, id="grey-jpeg-noise"),
    ],
)
def test_a_picture_with_nothing_but_background_is_named_not_classified(name, write, tmp_path):
    # A model names a class for an empty input too (a sandal at 54% for one trained briefly).
    path = tmp_path / name
    write(path)
    inputs, failures = read_inputs([path])
    assert inputs == []
    assert [f.message for f in failures] == [
        f"{path}: nothing to classify: every pixel is within 5% of the background's shade"
    ]


def test_a_faint_garment_is_still_a_garment(test_set, tmp_path):
    # 40 grey levels of contrast: dim, but well above the noise the blank rule is there for.
    images, _ = test_set
    faint = 100 + np.round(images[0] / 255.0 * 40)
    Image.fromarray(faint.astype(np.uint8)).save(tmp_path / "faint.png")
    item = predict.load_model_input(tmp_path / "faint.png")
    assert item.pixels.max() == 1.0
    assert _shift_tolerant_correlation(item.pixels[..., 0], images[0] / 255.0) > 0.9


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"not an image at all\n", "Pillow cannot identify it; readable formats include", id="text"),
        pytest.param(None, "image file is truncated", id="truncated-png"),
    ],
)
def test_an_unreadable_file_is_named_with_the_reason(content, reason, tmp_path):
    path = tmp_path / "broken.png"
    if content is None:
        Image.new("L", (50, 50), 128).save(path)
        content = path.read_bytes()[:60]
    path.write_bytes(content)
    with pytest.raises(predict.ImageReadError) as caught:
        predict.load_model_input(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable image (") and reason in message
    assert "\n" not in message


def test_folders_give_their_images_and_pass_over_other_files(tmp_path):
    (tmp_path / "shoes" / "more").mkdir(parents=True)
    for name in ("shoes/b.png", "shoes/more/a.JPG", "shoes/notes.txt", "shoes/.hidden.png", "single.webp"):
        (tmp_path / name).write_bytes(b"")
    collected = predict.collect_images([tmp_path / "shoes", tmp_path / "single.webp", tmp_path / "nowhere"])
    assert collected.files == (tmp_path / "shoes/b.png", tmp_path / "shoes/more/a.JPG", tmp_path / "single.webp")
    assert collected.skipped == (tmp_path / "shoes/notes.txt",)
    assert collected.missing == (tmp_path / "nowhere",)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda root: root / "nowhere", "images: no file or folder '{folder}'; give a folder of PNG or JPEG "
                     "files, or one of them", id="missing"),
        pytest.param(lambda root: root, "images: no image files (PNG, JPEG, ...) in '{folder}'", id="no-images"),
    ],
)
def test_the_predict_flow_refuses_a_folder_without_images_before_any_run(make, message, tmp_path):
    from cnn_train.flows.params import ParameterError
    from cnn_train.flows.predict_flow import image_files

    (tmp_path / "notes.txt").write_text("no pictures here")
    folder = make(tmp_path)
    with pytest.raises(ParameterError) as caught:
        image_files(str(folder))
    assert str(caught.value) == message.format(folder=folder)


@pytest.mark.parametrize(
    ("name", "why"),
    [("locked", "is a folder this user cannot read"), ("locked/secret.png", "is in a folder this user cannot enter")],
    ids=["a-folder-it-cannot-list", "a-file-in-a-folder-it-cannot-enter"],
)
def test_a_path_the_user_cannot_read_is_said_so(tmp_path, monkeypatch, name, why):
    """As another account: a picture in /root gave a PermissionError traceback, and a folder it could not
    list said 'no image files'. The suite runs as root, which reads anything, so the OS's refusals are
    played here: stat inside the folder fails, and access() says no to listing it."""
    from cnn_train.flows.params import ParameterError
    from cnn_train.flows.predict_flow import image_files

    locked = tmp_path / "locked"
    locked.mkdir()
    Image.new("L", (28, 28)).save(locked / "secret.png")
    is_dir, access = Path.is_dir, os.access

    def refusing_is_dir(path: Path) -> bool:
        if path.parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", refusing_is_dir)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    with pytest.raises(ParameterError) as caught:
        image_files(str(tmp_path / name))
    assert str(caught.value) == (
        f"images: '{tmp_path / name}' {why} (permission denied); give a folder of PNG or JPEG files, or one of them"
    )


def test_the_predict_flow_reads_a_folder_under_home_and_says_where_a_relative_one_was_looked_for(tmp_path, monkeypatch):
    from cnn_train.flows.params import ParameterError
    from cnn_train.flows.predict_flow import image_files

    (tmp_path / "photos").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "photos" / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "photos")
    assert image_files("~/photos") == [tmp_path / "photos" / "a.png"]
    assert image_files("~/photos/a.png") == [tmp_path / "photos" / "a.png"]  # one picture is fine too
    with pytest.raises(ParameterError) as caught:
        image_files("photos")
    assert str(caught.value) == (
        f"images: no file or folder 'photos' (relative to {tmp_path / 'photos'}, where this flow runs); "
        "give a folder of PNG or JPEG files, or one of them"
    )


# --- the table, top-k and the summary ------------------------------------------------------------


def test_top_k_names_the_likeliest_classes_first():
    probabilities = np.array([[0.05, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.8, 0.0, 0.05]])
    (ranked,) = predict.top_k(probabilities, 3)
    assert [name for name, _ in ranked] == ["Sneaker", "Sandal", "T-shirt/top"]
    assert predict.top_k_line("shoe.jpg", ranked) == "shoe.jpg: Sneaker 80.0% | Sandal 10.0% | T-shirt/top 5.0%"


def test_the_summary_counts_classes_and_flags_low_confidence():
    probabilities = np.eye(10)[[7, 7, 9]] * 0.9 + 0.01
    probabilities[2] = np.full(10, 0.1)  # no opinion: predicted T-shirt/top at 10%
    table = predict.predictions_table(["a.png", "b.png", "c.png"], probabilities)
    assert list(table.columns) == ["image", "predicted", "probability", *FASHION_MNIST_CLASSES]
    summary = predict.summarize(predict.Predictions((), table, (predict.Failure(Path("d.png"), "d.png: broken"),)))
    counts = summary.as_dict()["class_counts"]
    assert (counts["Sneaker"], counts["T-shirt/top"], counts["Ankle boot"], sum(counts.values())) == (2, 1, 0, 3)
    assert list(summary.low_confidence["image"]) == ["c.png"]
    assert "- d.png: broken" in summary.markdown("some model")
    assert summary.headline("some model") == (
        "**3 images classified, 1 failed** with some model; 1 with a top probability under 50%.\n\n"
        "Most predicted: Sneaker (2), T-shirt/top (1).\n\n"
        "The predictions, their summary and the model's inputs: `predictions/` in Artifacts."
    )


def test_the_headline_names_every_class_tied_for_the_last_place():
    """'Trouser (2), Pullover (1), Sandal (1)' left out Ankle boot, predicted once too."""
    classes = [1, 1, 2, 5, 9]  # Trouser twice; Pullover, Sandal and Ankle boot once each
    table = predict.predictions_table([f"{i}.png" for i in range(5)], np.eye(10)[classes] * 0.9 + 0.01)
    headline = predict.summarize(predict.Predictions((), table, ())).headline("m")
    assert "Most predicted: Trouser (2), Pullover (1), Sandal (1), Ankle boot (1).\n" in headline


# --- what a model must take ------------------------------------------------------------------------


def _tensor_schema(*shape: int, dtype: str = "float32"):
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(dtype), shape)])


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        pytest.param(None, None, "m has no input signature; cnn-train predicts with models that take float images (-1, 28, 28, 1)", id="no-signature"),
        pytest.param(_tensor_schema(-1, 784), None, "m takes float32 (-1, 784); cnn-train predicts", id="flat-vectors"),
        pytest.param(_tensor_schema(-1, 28, 28, 3), None, "m takes float32 (-1, 28, 28, 3); cnn-train", id="colour-images"),
        pytest.param(_tensor_schema(-1, 28, 28, 1, dtype="uint8"), None, "m takes uint8 (-1, 28, 28, 1)", id="integer-pixels"),
        pytest.param(_tensor_schema(-1, 28, 28, 1), _tensor_schema(-1, 5), "m gives (-1, 5) per batch, not one probability for each of the 10", id="five-outputs"),
    ],
)
def test_a_model_that_does_not_take_28x28x1_images_is_refused_in_one_line(inputs, outputs, message):
    with pytest.raises(predict.UnusableModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict.check_signature("m", inputs, outputs)


def test_the_logged_signature_takes_images_and_names_its_output():
    signature = tracking.models.model_signature((28, 28, 1), 10)
    predict.check_signature("m", signature.inputs, signature.outputs)
    assert signature.outputs.input_names() == ["probabilities"]


# --- with a trained model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(mlflow_store: str) -> dict:
    """A small real CNN trained through the flow and registered: the store's only champion."""
    from cnn_train.flows.train_flow import cnn_train

    state = cnn_train(
        epochs=2, sample_limit=3000, test_limit=500, batch_size=32, seed=0, register=MODEL_NAME, return_state=True
    )
    assert state.is_completed(), state.message
    return state.result()


def _run_name(champion: dict) -> str:
    """The champion's MLflow run name: what ran and its Prefect flow run, torch-cnn-<flow run name>."""
    from mlflow import MlflowClient

    name = MlflowClient().get_run(champion["mlflow_run_id"]).info.run_name
    assert name.startswith("torch-cnn-") and len(name) > len("torch-cnn-")
    return name


@pytest.fixture(scope="module")
def exported(champion, test_set, mlflow_store, tmp_path_factory) -> dict:
    """Two test images per class written out in the variants, beside a file that is no image, and the
    model's own top-1 on the original 28x28 arrays."""
    images, labels = test_set
    indices = [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:PER_CLASS]]
    folder = tmp_path_factory.mktemp("photos")
    names = list(VARIANTS)
    files = [VARIANTS[names[n % len(names)]](images[i], folder / f"{n:02d}-{names[n % len(names)]}") for n, i in enumerate(indices)]
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8 this was never a photo")
    model = tracking.load_pyfunc(f"models:/{MODEL_NAME}@champion", mlflow_store)
    originals = np.asarray(model.predict((images[indices] / 255.0).astype(np.float32)[..., np.newaxis])).argmax(axis=1)
    return {"folder": folder, "files": files, "indices": indices, "originals": originals}


@pytest.fixture(scope="module")
def predicted(exported, tmp_path_factory) -> dict:
    """`cnn-train predict FOLDER --output --show-inputs` with the default model, once for the tests below."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    out = tmp_path_factory.mktemp("out")
    # The command sets its settings in os.environ (its logs to stdout, among them); set up before any test,
    # they would outlive the module on this worker and reach later tests' subprocesses.
    with mock.patch.dict(os.environ):
        result = CliRunner().invoke(
            app, ["predict", str(exported["folder"]), "--output", str(out / "p.csv"), "--show-inputs", str(out / "seen")],
        )
    return {"result": result, "csv": out / "p.csv", "seen": out / "seen"}


@pytest.mark.slow
def test_predict_agrees_with_the_model_on_the_original_arrays(exported, predicted):
    table = pd.read_csv(predicted["csv"])
    assert list(table["image"]) == [str(path) for path in exported["files"]]
    expected = [FASHION_MNIST_CLASSES[i] for i in exported["originals"]]
    agree = int((table["predicted"] == expected).sum())
    print(f"same top-1 class as on the original arrays: {agree} of {len(table)}")
    assert len(table) == 20 and agree >= 18
    np.testing.assert_allclose(table[list(FASHION_MNIST_CLASSES)].sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_predict_names_the_bad_file_and_still_classifies_the_others(exported, predicted):
    result = predicted["result"]
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"cnn-train: {exported['folder'] / 'zz-broken.jpg'}: not a readable image "
        "(Pillow cannot identify it; readable formats include BMP, GIF, JPEG, PNG, TIFF, WEBP)",
        "20 images classified, 1 failed",
    ]
    lines = result.stdout.splitlines()
    assert lines[0] == f"model: models:/{MODEL_NAME}@champion (version 1, test accuracy " + lines[0].split("accuracy ")[1]
    assert lines[0].endswith("), the experiment's registered champion")  # the only one: no ranking to explain
    ranked = [line for line in lines if line.startswith(str(exported["folder"]))]
    assert len(ranked) == 20 and all(line.count("%") == 3 for line in ranked)


@pytest.mark.slow
def test_show_inputs_writes_what_the_model_saw(predicted):
    seen = sorted(predicted["seen"].glob("*.png"))
    assert len(seen) == 20
    with Image.open(seen[0]) as first:
        assert first.size == (28, 28) and first.mode == "L"


@pytest.mark.parametrize(
    ("files", "names"),
    [
        pytest.param(["a/x.jpg", "b/x.png"], ["x.png", "x-2.png"], id="same-stem-in-two-folders"),
        pytest.param(["#hash.png", "%20x%41.png", "new\nline.png", "why?.jpg"], ["_hash.png", "_20x_41.png", "new_line.png", "why_.png"],
                     id="what-mlflow-cannot-serve"),
        pytest.param(["two words 'é' ü.png"], ["two words 'é' ü.png"], id="spaces-quotes-and-letters-stay"),
        pytest.param(["a#.png", "a%.png"], ["a_.png", "a_-2.png"], id="made-alike-stay-apart"),
    ],
)
def test_the_names_of_what_the_model_saw_are_unique_and_servable(files, names):
    """A predict run's inputs/ in MLflow: `#hash.png` answered 400 and `%20x%41.png` 404 from its server."""
    inputs = [predict.ModelInput(path=Path(name), pixels=np.zeros((28, 28, 1), np.float32), inverted=False) for name in files]
    assert predict.input_file_names(inputs) == names


@pytest.mark.slow
def test_a_model_that_does_not_exist_lists_what_does(champion, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    run = subprocess.run(
        [BIN / "cnn-train", "predict", str(image), "--model", "models:/no-such-model@champion"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2  # a mistake on the command line, as an image that does not exist
    assert run.stderr.splitlines() == [
        f"cnn-train: no model version answers to models:/no-such-model@champion; no registered model is named "
        f"'no-such-model'; registered models: "
        f"{MODEL_NAME} (@champion=v1); recent finished runs with a model in 'cnn-train': "
        f"runs:/{champion['mlflow_run_id']}/model ({_run_name(champion)}, test accuracy {champion['test_accuracy'] * 100:.2f}%)"
    ]


@pytest.mark.parametrize(
    ("given", "lines"),
    [
        pytest.param(
            ["nowhere"],
            ["cnn-train: {tmp}/nowhere: no such file or folder; give PNG or JPEG files, or folders holding them"],
            id="only-a-missing-path",
        ),
        pytest.param(
            ["pipe"],
            ["cnn-train: {tmp}/pipe: not a regular file or folder (a pipe, socket or device); give PNG or JPEG files, "
             "or folders holding them"],
            id="a-named-pipe",
        ),
        pytest.param(
            ["nowhere", "docs"],
            ["cnn-train: {tmp}/nowhere: no such file or folder",
             "skipped 1 file without an image ending: {tmp}/docs/notes.txt",
             "cnn-train: no image files among {tmp}/nowhere, {tmp}/docs; give PNG or JPEG files, or folders holding them"],
            id="a-missing-path-among-others",
        ),
    ],
)
def test_paths_without_images_say_so_before_any_model_is_looked_up(tmp_path, given, lines):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "pipe")  # it read as missing
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = CliRunner().invoke(app, ["predict", *(str(tmp_path / name) for name in given)], env=env)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [line.format(tmp=tmp_path) for line in lines]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("options", "line"),
    [
        pytest.param(["--output", "{tmp}/x.png/p.csv"], "cannot make the folder {tmp}/x.png: {tmp}/x.png is a file", id="output-under-a-file"),
        pytest.param(["--show-inputs", "{tmp}/x.png/seen/28x28"], "cannot make the folder {tmp}/x.png/seen/28x28: {tmp}/x.png is a file", id="inputs-under-a-file"),
        pytest.param(["--output", "{tmp}"], "Invalid value for '--output': file '{tmp}' is a directory", id="output-is-a-folder"),
        pytest.param(["--show-inputs", "{tmp}/x.png"], "Invalid value for '--show-inputs': dir '{tmp}/x.png' is a file", id="inputs-is-a-file"),
        # Path('') is the current folder: `predict ''` classified the whole project, `--show-inputs ''` wrote into it.
        pytest.param([""], "Invalid value for 'PATH': an empty path; name a file or folder", id="empty-path"),
        pytest.param(["--output", ""], "Invalid value for '--output': an empty path; name a file", id="empty-output"),
        # Its folder exists, so it was found out only after predicting (the predictions printed, then exit 1).
        pytest.param(["--output", "/proc/cnn-train.csv"], "cannot write /proc/cnn-train.csv: No such file or directory; "
                     "choose another path", id="output-cannot-be-created"),
        pytest.param(["--show-inputs", ""], "Invalid value for '--show-inputs': an empty path; name a folder", id="empty-inputs-folder"),
    ],
)
def test_a_destination_that_cannot_hold_the_results_fails_before_any_model_is_looked_up(tmp_path, options, line):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    given = [option.format(tmp=tmp_path) for option in options]
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"), *given], env=env)
    assert result.exit_code == 2
    assert line.format(tmp=tmp_path) in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("existing", [None, "kept,from,before\n"], ids=["new-file", "existing-file"])
def test_trying_the_output_file_first_leaves_no_file_and_changes_none(tmp_path, existing):
    """The early check opens --output to append; a run that then fails must not leave or alter it."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    output = tmp_path / "predictions.csv"
    if existing is not None:
        output.write_text(existing)
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing answers: the command fails after the check
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"), "--output", str(output)], env=env)
    assert result.exit_code == 2 and "127.0.0.1:9" in result.output, result.output
    assert (output.read_text() if output.exists() else None) == existing


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "says"),
    [
        pytest.param("runs:/{run_id}/no-such-path", "(Failed to download artifacts from path 'no-such-path'", id="run-artifact"),
    ],
)
def test_a_model_uri_with_nothing_loadable_is_one_line(champion, tmp_path, where, says):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    model = where.format(run_id=champion["mlflow_run_id"], folder=tmp_path)
    result = CliRunner().invoke(app, ["predict", str(image), "--model", model])
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"cnn-train: no model MLflow can load at {model} {says}"), line
    assert line.endswith(f"recent finished runs with a model in 'cnn-train': runs:/{champion['mlflow_run_id']}/model "
                         f"({_run_name(champion)}, test accuracy {champion['test_accuracy'] * 100:.2f}%)"), line


@pytest.mark.slow
def test_a_loaded_models_files_go_with_the_model(champion, test_set, mlflow_store, tmp_path, monkeypatch):
    """MLflow leaves a model it downloads in a temporary folder for good (a server's proxied artifacts: one
    copy per `cnn-train predict`); the folder cnn-train loads into goes when the model does."""
    import gc
    import tempfile

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    model = tracking.load_pyfunc(f"models:/{MODEL_NAME}@champion", mlflow_store)
    (download,) = system_tmp.iterdir()
    assert download.name.startswith("cnn-train-model-") and list(download.rglob("MLmodel")), download
    images, _ = test_set
    assert np.asarray(model.predict((images[:4] / 255.0).astype(np.float32)[..., np.newaxis])).shape == (4, 10)
    del model
    gc.collect()
    assert list(system_tmp.iterdir()) == []
    with pytest.raises(tracking.ModelNotFoundError):
        tracking.load_pyfunc(f"runs:/{champion['mlflow_run_id']}/no-such-path", mlflow_store)
    assert list(system_tmp.iterdir()) == [], "a failed load leaves nothing either"


@pytest.mark.slow
def test_the_registered_version_carries_its_facts_and_the_run_says_why(champion, mlflow_store):
    client = tracking.client(mlflow_store)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    tags = version.tags
    assert float(tags["test_accuracy"]) == pytest.approx(champion["test_accuracy"])
    assert (tags["backend"], tags["architecture"], tags["mlflow_run_id"]) == ("torch", "cnn", champion["mlflow_run_id"])
    assert len(tags["dataset_digest"]) == 16 and len(tags["test_set_digest"]) == 16
    assert tags["prefect_flow_run_id"]
    run_tags = client.get_run(champion["mlflow_run_id"]).data.tags
    assert run_tags["cnn_train.registered_model"] == f"{MODEL_NAME}/1"
    assert run_tags["cnn_train.registered_reason"] == "there was no champion yet"
    assert champion["registration"] == f"registered {MODEL_NAME} version 1 as champion: there was no champion yet"


@pytest.mark.slow
def test_the_registration_is_a_prefect_event_an_automation_can_react_to(champion, prefect_api_url):
    """``cnn-train.model-version.champion``, about the new version, related to the flow run that registered it."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    # This version's: another module on this worker's Prefect server may register a champion of its own.
    wanted = EventFilter(event=EventNameFilter(name=["cnn-train.model-version.champion"]),
                         resource=EventResourceFilter(id=[f"mlflow.model-version.{MODEL_NAME}.1"]))
    deadline = time.monotonic() + 60  # the client sends its events in the background
    with get_client(sync_client=True) as client:
        while not (events := client.read_events(wanted, limit=10).events) and time.monotonic() < deadline:
            time.sleep(0.5)
    (event,) = events
    assert event.resource.id == f"mlflow.model-version.{MODEL_NAME}.1"
    assert event.payload | {"test_accuracy": None} == {
        "name": MODEL_NAME, "version": 1, "model_uri": f"models:/{MODEL_NAME}/1", "alias": "champion",
        "reason": "there was no champion yet", "test_accuracy": None, "backend": "torch", "architecture": "cnn",
        "mlflow_run_id": champion["mlflow_run_id"],
    }
    assert event.payload["test_accuracy"] == pytest.approx(champion["test_accuracy"])
    flow_run_id = tracking.client().get_run(champion["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    assert f"prefect.flow-run.{flow_run_id}" in {related.id for related in event.related}


@pytest.mark.slow
def test_the_predict_flow_leaves_the_csv_and_summary_in_mlflow(champion, exported, mlflow_store, tmp_path):
    from cnn_train.flows.predict_flow import cnn_train_predict

    result = cnn_train_predict(images=str(exported["folder"]))
    client = tracking.client(mlflow_store)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["cnn_train.model_uri"] == f"models:/{MODEL_NAME}@champion"
    assert run.data.metrics["images_classified"] == 20 and run.data.metrics["images_failed"] == 1
    assert run.data.tags["mlflow.note.content"].startswith(
        f"**20 images classified, 1 failed** with models:/{MODEL_NAME}@champion (version 1, test accuracy "
    )
    assert "\n\nMost predicted: " in run.data.tags["mlflow.note.content"]
    trained_model = client.get_run(champion["mlflow_run_id"]).outputs.model_outputs[0].model_id
    assert [m.model_id for m in run.inputs.model_inputs] == [trained_model]
    local = Path(client.download_artifacts(run.info.run_id, "predictions", str(tmp_path)))
    assert len(pd.read_csv(local / "predictions.csv")) == 20
    summary = json.loads((local / "summary.json").read_text())
    assert sum(summary["class_counts"].values()) == 20 and len(summary["failed"]) == 1
    assert (local / "examples.png").is_file() and len(list((local / "inputs").glob("*.png"))) == 20


@pytest.mark.slow
def test_a_predict_run_that_classifies_nothing_fails(champion, mlflow_store, tmp_path):
    """It ended Completed, 'images classified: 0', where `cnn-train predict` exits 1: a script or automation
    took a total failure for a success."""
    from cnn_train.flows.predict_flow import cnn_train_predict

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    state = cnn_train_predict(images=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("none of the 2 image file(s) could be classified ("), state.message
    (run,) = tracking.client(mlflow_store).search_runs(
        [tracking.client(mlflow_store).get_experiment_by_name("cnn-train-predict").experiment_id],
        f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'",
    )
    assert run.info.status == "FAILED" and run.data.metrics["images_failed"] == 2, "the failures are still recorded"


# --- REST serving --------------------------------------------------------------------------------


def _wait_until_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer {url} within {timeout:.0f} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_ten_probabilities_per_image(champion, test_set, mlflow_store, tmp_path):
    images, labels = test_set
    model = tracking.load_pyfunc(f"models:/{MODEL_NAME}@champion", mlflow_store)
    scaled = (images[:100] / 255.0).astype(np.float32)[..., np.newaxis]
    right = np.flatnonzero(np.asarray(model.predict(scaled)).argmax(axis=1) == labels[:100])[:2]
    port = free_port()
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": mlflow_store}
    log = (tmp_path / "serve.log").open("w")
    # Exactly the README's command; its own process group, so stopping it stops uvicorn's workers too.
    server = subprocess.Popen(
        [BIN / "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        body = json.dumps({"inputs": scaled[right].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    probabilities = np.asarray(answer["predictions"])
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(probabilities.argmax(axis=1)) == list(labels[right])


@pytest.mark.slow
def test_a_keras_model_predicts_where_keras_would_pick_tensorflow(mlflow_store, prefect_api_url, tmp_path, monkeypatch):
    """Keras takes its backend as it is imported: KERAS_BACKEND, else ~/.keras/keras.json, which Keras itself
    writes with TensorFlow. A keras backend's model then failed to load (`No module named 'tensorflow'`)."""
    from cnn_train.flows.train_flow import cnn_train
    from tests.stores import new_store

    store = new_store(tmp_path / "keras.db")  # the module's store keeps its one champion and its runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    state = cnn_train(backend="keras", architecture="dense", epochs=1, sample_limit=400, test_limit=100, return_state=True)
    assert state.is_completed(), state.message
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text(json.dumps({"backend": "tensorflow", "floatx": "float32"}))
    image = tmp_path / "x.png"
    picture = Image.new("L", (28, 28))
    picture.paste(220, (8, 4, 20, 24))  # a bright block: something to classify
    picture.save(image)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | {
        "HOME": str(home), "PREFECT_API_URL": prefect_api_url, "TMPDIR": str(system_tmp),
    }
    run = subprocess.run(
        [BIN / "cnn-train", "predict", str(image), "--model", f"runs:/{state.result()['mlflow_run_id']}/model"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    # Reading the model's backend from its MLmodel file left that file in a new temporary folder per predict.
    assert list(system_tmp.iterdir()) == []
    model_line, image_line = run.stdout.splitlines()  # no progress bar of Keras among the predictions
    assert model_line.startswith("model: runs:/") and image_line.startswith(f"{image}: "), run.stdout


@pytest.mark.parametrize(
    ("model_uri", "why"),
    [
        pytest.param("http://127.0.0.1:9/model", "ValueError: ", id="http"),
        pytest.param("s3://bucket/model", "loading from there needs the module 'botocore', which is not installed", id="s3-without-boto"),
    ],
)
def test_a_model_at_another_schemes_address_that_mlflow_cannot_load_is_one_line(tmp_path, model_uri, why):
    """MLflow's own loaders failed with a traceback each (an unpacking ValueError, a ModuleNotFoundError)."""
    import importlib.util

    from cnn_train.flows import tracking

    if model_uri.startswith("s3:") and importlib.util.find_spec("botocore"):
        pytest.skip("botocore is installed here: MLflow would go on to ask S3")
    with pytest.raises(tracking.ModelNotFoundError) as refused:
        tracking.load_pyfunc(model_uri, f"sqlite:///{tmp_path / 'mlflow.db'}")
    line = str(refused.value)
    assert line.startswith(f"MLflow cannot load a model from {model_uri} ({why}") and "\n" not in line, line


def test_a_command_that_finds_no_model_leaves_no_folder_it_made_for_results(tmp_path):
    """The folders for --output and --show-inputs are made first (a path that cannot hold results fails at once);
    a typo'd path left its whole new tree behind when the command then failed."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    (tmp_path / "kept").mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"), "--output", str(tmp_path / "kept" / "new" / "deep" / "p.csv"),
                                      "--show-inputs", str(tmp_path / "seen" / "28x28")], env=env)
    assert result.exit_code == 2 and "no model to default to" in result.output, result.output
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []
