"""Classify image files with a loaded model: one row per image with all ten probabilities, the top-k
classes in words, and a summary (class counts, low-confidence images, files that failed)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cnn_train.flows.predict.images import ImageReadError, ModelInput, load_model_input
from cnn_train.flows.predict.models import LoadedModel
from cnn_train.plugins.config import FASHION_MNIST_CLASSES

#: A top-1 probability under this is no better than a coin toss between it and the rest: flagged.
LOW_CONFIDENCE = 0.5
#: Leading columns of the predictions table; one column per class follows, named by the class.
LEADING_COLUMNS = ("image", "predicted", "probability")


@dataclass(frozen=True)
class Failure:
    """A file that could not be classified, and why (one line naming the file)."""

    path: Path
    message: str


@dataclass(frozen=True, eq=False)
class Predictions:
    """What a batch of files gave: the model's inputs, the table of probabilities, the failures."""

    inputs: tuple[ModelInput, ...]
    table: pd.DataFrame
    failures: tuple[Failure, ...]

    def probabilities(self) -> np.ndarray:
        return self.table[list(FASHION_MNIST_CLASSES)].to_numpy()


def read_inputs(files: Sequence[Path]) -> tuple[list[ModelInput], list[Failure]]:
    """Each file as the model's input; a file that is no readable image is a failure, the rest go on."""
    inputs, failures = [], []
    for path in files:
        try:
            inputs.append(load_model_input(path))
        except ImageReadError as error:
            failures.append(Failure(path, str(error)))
    return inputs, failures


def classify(model: LoadedModel, files: Sequence[Path]) -> Predictions:
    """Read and classify ``files``; unreadable ones are reported, not fatal."""
    inputs, failures = read_inputs(files)
    if inputs:
        probabilities = model.probabilities(np.stack([item.pixels for item in inputs]))
    else:
        probabilities = np.empty((0, len(FASHION_MNIST_CLASSES)))
    return Predictions(tuple(inputs), predictions_table([str(i.path) for i in inputs], probabilities), tuple(failures))


def predictions_table(images: Sequence[str], probabilities: np.ndarray) -> pd.DataFrame:
    """One row per image: its name, the predicted class and its probability, then every class's."""
    frame = pd.DataFrame(probabilities, columns=list(FASHION_MNIST_CLASSES))
    best = probabilities.argmax(axis=1) if len(probabilities) else np.empty(0, dtype=int)
    frame.insert(0, "probability", probabilities.max(axis=1) if len(probabilities) else [])
    frame.insert(0, "predicted", [FASHION_MNIST_CLASSES[i] for i in best])
    frame.insert(0, "image", list(images))
    return frame


def top_k(probabilities: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Per image, the ``k`` likeliest classes with their probabilities, likeliest first."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(FASHION_MNIST_CLASSES[i], float(row[i])) for i in ranked] for row, ranked in zip(probabilities, order, strict=True)]


def top_k_line(image: str, ranked: Sequence[tuple[str, float]]) -> str:
    """``shoe.jpg: Sneaker 93.1% | Sandal 5.2% | Ankle boot 1.0%``."""
    return f"{image}: " + " | ".join(f"{name} {probability * 100:.1f}%" for name, probability in ranked)


@dataclass(frozen=True, eq=False)
class Summary:
    """Class counts, the low-confidence images and the failures of one batch."""

    class_counts: pd.DataFrame
    low_confidence: pd.DataFrame
    failures: tuple[Failure, ...]
    classified: int

    def as_dict(self) -> dict[str, object]:
        return {
            "classified": self.classified,
            "failed": [{"image": str(f.path), "error": f.message} for f in self.failures],
            "class_counts": dict(zip(self.class_counts["class"], map(int, self.class_counts["images"]), strict=True)),
            "low_confidence_threshold": LOW_CONFIDENCE,
            "low_confidence": self.low_confidence.to_dict(orient="records"),
        }

    def headline(self, model: str) -> str:
        """A few markdown lines for the prediction run's MLflow page: the counts, the classes most predicted."""
        shown = self.class_counts[self.class_counts["images"] > 0]
        # The three largest counts and every class tied with the third: a cut-off tie named one of them only.
        most = shown.nlargest(3, "images", keep="all").to_dict(orient="records")
        lines = [
            f"**{counted(self.classified, len(self.failures))}** with {model}; {len(self.low_confidence)} with a top "
            f"probability under {LOW_CONFIDENCE:.0%}.",
        ]
        if most:
            lines += ["", "Most predicted: " + ", ".join(f"{row['class']} ({row['images']})" for row in most) + "."]
        return "\n".join([*lines, "", "The predictions, their summary and the model's inputs: `predictions/` in Artifacts."])

    def markdown(self, model: str) -> str:
        from cnn_train.flows.reporting import markdown_table

        lines = [
            "# Predictions", "", f"Model: {model}", "",
            f"{counted(self.classified, len(self.failures))}.", "", "## Predicted classes", "",
            markdown_table(self.class_counts), "",
            f"## Low confidence (top probability under {LOW_CONFIDENCE:.0%})", "",
            markdown_table(self.low_confidence, {"probability": _percent}) if len(self.low_confidence) else "None.",
        ]
        if self.failures:
            lines += ["", "## Failed", ""] + [f"- {failure.message}" for failure in self.failures]
        return "\n".join(lines) + "\n"


def counted(classified: int, failed: int) -> str:
    """``'1 image classified, 2 failed'``: the one summary line of a prediction."""
    return f"{classified} image{'s' if classified != 1 else ''} classified, {failed} failed"


def _percent(value: object) -> str:
    return f"{float(value) * 100:.1f}%"  # type: ignore[arg-type]


def summarize(predictions: Predictions) -> Summary:
    table = predictions.table
    counts = table["predicted"].value_counts().reindex(FASHION_MNIST_CLASSES, fill_value=0)
    class_counts = pd.DataFrame({"class": list(FASHION_MNIST_CLASSES), "images": counts.to_numpy(dtype=int)})
    low = table.loc[table["probability"] < LOW_CONFIDENCE, list(LEADING_COLUMNS)].sort_values("probability")
    return Summary(class_counts, low.reset_index(drop=True), predictions.failures, len(table))


def write_outputs(predictions: Predictions, summary: Summary, folder: Path, *, model: str) -> dict[str, Path]:
    """``predictions.csv``, ``summary.json`` and ``summary.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "predictions.csv", "json": folder / "summary.json", "markdown": folder / "summary.md"}
    predictions.table.to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps({"model": model, **summary.as_dict()}, indent=2), encoding="utf-8")
    paths["markdown"].write_text(summary.markdown(model), encoding="utf-8")
    return paths


#: What an MLflow server cannot serve back in an artifact's name (``#`` and ``?`` end the path, ``%`` is
#: decoded twice), and control characters (a newline split the name across lines).
_UNSERVABLE = re.compile(r"[#%?\x00-\x1f\x7f]")


def input_file_names(inputs: Sequence[ModelInput]) -> list[str]:
    """A unique PNG name per input for the pictures the model saw (two ``a.jpg`` in different folders
    stay apart), with ``_`` for the characters an MLflow server cannot serve back (:data:`_UNSERVABLE`)."""
    names, seen = [], set()
    for item in inputs:
        stem = _UNSERVABLE.sub("_", item.path.stem)
        name, n = f"{stem}.png", 1
        while name in seen:
            n += 1
            name = f"{stem}-{n}.png"
        seen.add(name)
        names.append(name)
    return names
