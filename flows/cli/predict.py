"""``cnn-train predict`` (classify image files) and ``cnn-train models`` (the model registry)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from cnn_train.flows.cli.app import app, fail, typed_path


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", parser=typed_path(), help="Image files (PNG, JPEG, ...) and folders of them.")],
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads it
        typer.Option(
            help="runs:/<run id>/model, models:/<name>/<version>, models:/<name>@<alias>, a logged model id m-... "
            "or a model's folder (holding its MLmodel file); "
            "default: the cnn-train experiment's best registered champion, else its latest finished run."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=10, help="Classes shown per image, likeliest first.")] = 3,
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(parser=typed_path("file"), help="Write one row per image with all ten probabilities to this CSV file."),
    ] = None,
    show_inputs: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(parser=typed_path("dir"), help="Write the 28x28 images the model actually saw to this folder (PNG)."),
    ] = None,
) -> None:
    """Classify image files: any size, colour or grayscale, brought to 28x28 the way Fashion-MNIST was made."""
    from cnn_train.flows import predict as prediction
    from cnn_train.flows import tracking

    collected = prediction.collect_images(paths)
    if not collected.files and len(collected.missing) == len(paths):  # nothing to warn about besides: one line
        why = "; ".join(f"{path}: {prediction.not_taken(path)}" for path in collected.missing)
        fail(f"{why}; give PNG or JPEG files, or folders holding them")
    for missing in collected.missing:
        typer.echo(f"cnn-train: {missing}: {prediction.not_taken(missing)}", err=True)
    if collected.skipped:
        names = ", ".join(str(path) for path in collected.skipped[:5]) + (" ..." if len(collected.skipped) > 5 else "")
        count = len(collected.skipped)
        typer.echo(f"skipped {count} file{'s' if count != 1 else ''} without an image ending: {names}", err=True)
    if not collected.files:
        fail(f"no image files among {', '.join(map(str, paths))}; give PNG or JPEG files, or folders holding them")
    # Where the results go is made before the model loads, so a path that cannot hold them fails at once.
    made = _make_folders(*([output.parent] if output else []), *([show_inputs] if show_inputs else []))
    try:
        if output is not None:
            _check_writable(output)
        try:
            tracking.check_reachable(tracking.tracking_uri())
        except tracking.TrackingUnavailableError as error:
            fail(str(error))
        # A model that does not exist is a mistake on the command line (exit 2, as a missing image); one that
        # exists but does not take 28x28x1 images, or cannot load, is an expected failure: one line, exit 1.
        try:
            choice = prediction.choose_model(model)
            loaded = prediction.load_model(choice)
        except tracking.ModelNotFoundError as error:
            fail(str(error))
    except BaseException:  # nothing to put in them: a typo'd path leaves no folder tree behind
        for folder in made:
            with contextlib.suppress(OSError):  # not empty after all: keep it
                folder.rmdir()
        raise
    typer.echo(f"model: {choice.described}")
    predictions = prediction.classify(loaded, collected.files)
    ranked = prediction.top_k(predictions.probabilities(), top_k)
    for image, classes in zip(predictions.table["image"], ranked, strict=True):
        typer.echo(prediction.top_k_line(image, classes))
    for failure in predictions.failures:
        typer.echo(f"cnn-train: {failure.message}", err=True)
    try:
        if output is not None:
            predictions.table.to_csv(output, index=False)
            typer.echo(f"predictions: {output}")
        if show_inputs is not None:
            names = prediction.input_file_names(predictions.inputs)
            prediction.write_model_inputs(predictions.inputs, show_inputs, names)
            typer.echo(f"the model's 28x28 inputs: {show_inputs}")
    except OSError as error:  # the predictions above are printed; only the file is missing
        fail(f"cannot write {error.filename or output}: {error.strerror or error}", code=1)
    failed = len(predictions.failures) + len(collected.missing)
    if failed:
        typer.echo(prediction.counted(len(predictions.table), failed), err=True)
        raise typer.Exit(1)


def _check_writable(path: Path) -> None:
    """Fail now, not after predicting, when ``path`` cannot be written (e.g. under /proc, or read-only)."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as error:
        fail(f"cannot write {path}: {error.strerror or error}; choose another path")
    if not existed:  # made only to try; the results replace it
        path.unlink(missing_ok=True)


def _make_folders(*folders: Path) -> list[Path]:
    """Make ``folders``; returns the ones made, deepest first (to take back should the command fail)."""
    made: list[Path] = []
    for folder in folders:
        made = [path for path in (folder, *folder.parents) if not path.exists()] + made
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file where a folder should be, or no permission
            in_the_way = next((path for path in (folder, *folder.parents) if path.is_file()), None)
            reason = f"{in_the_way} is a file" if in_the_way else error.strerror or str(error)
            fail(f"cannot make the folder {folder}: {reason}; choose another path")
    return made


@app.command()
def models(
    names: Annotated[list[str] | None, typer.Argument(help="Only these registered models (all when none is named).", show_default=False)] = None,
) -> None:
    """List registered models: versions, aliases (champion, challenger), test accuracy, backend."""
    from cnn_train.flows import reporting, tracking

    uri = tracking.tracking_uri()
    try:
        tracking.check_reachable(uri)
        versions = tracking.registered_versions(uri, names or ())
    except (tracking.TrackingUnavailableError, tracking.UnknownModelNameError) as error:
        fail(str(error))
    if versions.empty:
        typer.echo(f"no registered models in {uri}; register one with `cnn-train run --register NAME`")
        return
    typer.echo(reporting.markdown_table(versions))
