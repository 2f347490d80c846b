"""The recipe's steps as plain functions: prepare, train, evaluate. No Prefect here, so each
step is testable on its own; the flow wraps them in tasks and gives them their devices."""

from __future__ import annotations

import json
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from cnn_train.flows.data import PreparedData, prepare_data
from cnn_train.flows.params import TRAINING_VALUES, RunParameters
from cnn_train.flows.reports import classification_tables
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins import registry
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainData, TrainHistory

_PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training: where its checkpoint is and what each epoch measured."""

    architecture: str
    checkpoint: Path
    history: TrainHistory
    parameters: int
    model_uri: str
    resumed_from_epoch: int

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.median([e.seconds for e in self.history.epochs]))

    @property
    def images_per_second(self) -> float:
        return float(np.median([e.images_per_second for e in self.history.epochs]))


@dataclass(frozen=True)
class EvalOutcome:
    """Test-set results, with what the report needs to draw."""

    evaluation: Evaluation
    probabilities: np.ndarray
    feature_maps: dict[str, np.ndarray]
    kernels: np.ndarray | None


def prepare(params: RunParameters) -> PreparedData:
    return prepare_data(
        Path(params.data_dir) if params.data_dir else None,
        validation_fraction=params.validation_fraction,
        seed=params.seed,
        sample_limit=params.sample_limit,
        test_limit=params.test_limit,
    )


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_description(params: RunParameters) -> dict[str, str]:
    """Backend provenance and library versions, logged as params so runs can be compared on them."""
    info = registry.backend_info(params.backend)
    described = {
        "backend.distribution": info.distribution,
        "backend.version": info.version,
        "backend.entry_point": info.target,
        "python": platform.python_version(),
    }
    for package in ("cnn-train", "torch", "keras", "mlflow", "prefect", "scikit-learn", "numpy"):
        described[f"version.{package}"] = _package_version(package)
    return described


def log_run_params(tracker: RunTracker, params: RunParameters) -> None:
    """Every flow parameter and the backend's provenance and library versions."""
    tracker.log_params(params.model_dump())
    tracker.log_params(run_description(params))
    tracker.log_params({"model.parameters": params.model().parameter_count()})
    tracker.log_params(training_extras(params))


def training_extras(params: RunParameters) -> dict[str, object]:
    """What the run trains with beyond its flow parameters: the lesson's plain values, or the recipe's."""
    model, training = params.model(), params.training()
    extras = training.model_dump(exclude={*TRAINING_VALUES, "seed"})
    layers = {"conv_filters": ",".join(str(block.filters) for block in model.conv_layers)}
    layers |= {"batch_norm": model.batch_norm, "dropout": model.dropout}
    return {f"train.{key}": value for key, value in extras.items()} | {f"model.{k}": v for k, v in layers.items()}


def log_datasets(tracker: RunTracker, data: PreparedData) -> None:
    """Split sizes, and the datasets through MLflow's dataset API (digest and source)."""
    tracker.log_params({f"data.{key}": value for key, value in data.summary().items()})
    for context, (x, y) in {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}.items():
        tracker.log_dataset(x, y, name=f"fashion-mnist-{context}", source=data.source, digest=data.digest, context=context)


def _read_progress(checkpoint: Path) -> list[EpochMetrics]:
    progress = checkpoint / _PROGRESS_FILE
    if not progress.is_file():
        return []
    return [EpochMetrics(**item) for item in json.loads(progress.read_text())]


def _write_progress(checkpoint: Path, epochs: list[EpochMetrics]) -> None:
    tmp = checkpoint / (_PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps([e.__dict__ for e in epochs]))
    tmp.replace(checkpoint / _PROGRESS_FILE)


def train(
    params: RunParameters,
    data: PreparedData,
    tracker: RunTracker,
    *,
    device: str,
    checkpoint: Path,
    metric_prefix: str = "",
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> TrainOutcome:
    """Train (resuming from ``checkpoint`` when an earlier attempt saved epochs), log every epoch as
    it ends, then log the finished model. Only a completed training is logged as the model."""
    model_config = params.model()
    backend = registry.load_backend(params.backend)
    done = _read_progress(checkpoint)
    if done:
        backend.load(checkpoint / "weights", model_config, device=device)
        # An attempt can die between saving an epoch and logging it; log what MLflow lacks.
        logged = set(tracker.logged_steps(metric_prefix + "val_accuracy"))
        for metrics in done:
            if metrics.epoch not in logged:
                tracker.log_epoch(metrics, prefix=metric_prefix)
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
        checkpoint.mkdir(parents=True)
        backend.build(model_config, device=device, seed=params.seed)

    epochs = list(done)

    def finished_epoch(metrics: EpochMetrics) -> None:
        # Checkpoint first: a retry then resumes after this epoch and re-logs it if needed.
        backend.save(checkpoint / "weights")
        epochs.append(metrics)
        _write_progress(checkpoint, epochs)
        tracker.log_epoch(metrics, prefix=metric_prefix)
        if on_epoch is not None:
            on_epoch(metrics)

    train_data = TrainData(data.x_train, data.y_train, data.x_val, data.y_val)
    backend.train(train_data, params.training(), on_epoch=finished_epoch, initial_epoch=len(done))
    if [m.epoch for m in epochs] != list(range(1, params.epochs + 1)):
        raise BackendOutputError(
            f"backend {params.backend!r} reported epochs {[m.epoch for m in epochs]} through on_epoch, "
            f"expected 1..{params.epochs}; the model is not logged"
        )
    model_uri = tracker.log_model(
        backend.loggable_model(),
        input_shape=model_config.input_shape,
        num_classes=model_config.num_classes,
        # Two images: a batch of one would let PyTorch's exporter fix the batch size at 1.
        input_example=data.x_val[:2],
        name="model" if not metric_prefix else metric_prefix.rstrip("._") + "_model",
    )
    return TrainOutcome(
        architecture=model_config.architecture,
        checkpoint=checkpoint,
        history=TrainHistory(tuple(epochs)),
        parameters=backend.parameter_count(),
        model_uri=model_uri,
        resumed_from_epoch=len(done),
    )


def evaluate(
    params: RunParameters,
    trained: TrainOutcome,
    data: PreparedData,
    *,
    device: str,
) -> EvalOutcome:
    """Test loss and accuracy, probabilities for the report, and the lesson's feature maps."""
    model_config = params.model()
    backend = registry.load_backend(params.backend)
    backend.load(trained.checkpoint / "weights", model_config, device=device)
    evaluation = backend.evaluate(data.x_test, data.y_test)
    probabilities = np.asarray(backend.predict_proba(data.x_test))
    check_backend_outputs(params.backend, evaluation, probabilities, len(data.x_test), model_config.num_classes)
    layers = [name for name, _ in model_config.feature_map_shapes()]
    maps = backend.feature_maps(data.x_test[:1], layers) if layers else {}
    kernels = backend.first_conv_kernels() if layers else None
    return EvalOutcome(evaluation, probabilities, maps, kernels)


class BackendOutputError(RuntimeError):
    """A backend returned results that break the contract; the message names the backend and what."""


def check_backend_outputs(
    backend: str, evaluation: Evaluation, probabilities: np.ndarray, n: int, num_classes: int
) -> None:
    """Refuse results of the wrong shape or range before they reach MLflow or the report."""
    problems = []
    if probabilities.shape != (n, num_classes):
        problems.append(f"predict_proba returned shape {probabilities.shape}, expected ({n}, {num_classes})")
    elif not np.isfinite(probabilities).all() or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        problems.append("predict_proba rows must be finite probabilities summing to 1")
    if not (np.isfinite(evaluation.loss) and evaluation.loss >= 0):
        problems.append(f"evaluate returned loss {evaluation.loss}, expected a finite number >= 0")
    if not 0.0 <= evaluation.accuracy <= 1.0:
        problems.append(f"evaluate returned accuracy {evaluation.accuracy}, expected a fraction in [0, 1]")
    if problems:
        raise BackendOutputError(
            f"backend {backend!r} broke the contract: " + "; ".join(problems)
            + f". Check it with `cnn-train check-backend {backend}`"
        )


def _metric_key(class_name: str) -> str:
    """``"T-shirt/top"`` -> ``"t_shirt_top"``: MLflow-safe and stable."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", class_name).strip("_").lower()


def test_metrics(evaluated: EvalOutcome, data: PreparedData) -> dict[str, float]:
    """Test loss and accuracy, and precision, recall and F1 per class (scikit-learn)."""
    summary = classification_tables(data.y_test, evaluated.probabilities.argmax(axis=1), data.class_names)
    metrics = {"test_loss": evaluated.evaluation.loss, "test_accuracy": evaluated.evaluation.accuracy}
    for row in summary.per_class.to_dict(orient="records"):
        key = _metric_key(str(row["class"]))
        for measure in ("precision", "recall", "f1"):
            metrics[f"test_{measure}.{key}"] = float(row[measure])
    return metrics
