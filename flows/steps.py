"""The recipe's steps as plain functions: prepare, train, evaluate. No Prefect here, so each
step is testable on its own; the flow wraps them in tasks and gives them their devices."""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, log_loss

from cnn_train.flows.data import PreparedData, prepare_data
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.interrupts import deferred, interruptible
from cnn_train.flows.params import TRAINING_VALUES, RunParameters
from cnn_train.flows.placement import resolve_precision
from cnn_train.flows.reporting import classification_tables
from cnn_train.flows.settings import state_dir
from cnn_train.flows.tracking import ModelRecord, RunTracker
from cnn_train.plugins import registry
from cnn_train.plugins.config import TrainConfig
from cnn_train.plugins.contract import (
    EpochMetrics,
    Evaluation,
    LoggableModel,
    TrainHistory,
    probabilities_problem,
    returned_problem,
)

_PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training: where its checkpoint is and what each epoch measured.

    ``stopped_at_epoch`` is k when ``on_epoch`` asked to stop after epoch k < epochs (a pruned trial);
    such a training logs no model, so ``model_uri`` is None.
    """

    architecture: str
    device: str
    #: What the backend trained with: the run's TrainConfig with an "auto" precision resolved for ``device``.
    training: TrainConfig
    checkpoint: Path
    history: TrainHistory
    parameters: int
    model_uri: str | None
    resumed_from_epoch: int
    stopped_at_epoch: int | None = None


@dataclass(frozen=True)
class EvalOutcome:
    """Test-set results, with what the report needs to draw."""

    evaluation: Evaluation
    probabilities: np.ndarray
    feature_maps: dict[str, np.ndarray]
    kernels: np.ndarray | None


def checkpoint_dir(run_id: str) -> Path:
    """Where a run's training saves its epochs, so a retry resumes instead of starting over."""
    return state_dir() / "checkpoints" / run_id


def discard_checkpoint(run_id: str) -> None:
    """Drop a finished run's checkpoint: its model is in MLflow, nothing will resume it."""
    shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)


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


#: Packages every run records the version of, whatever its backend.
_PLATFORM_PACKAGES = ("cnn-train", "mlflow", "prefect", "numpy")


def run_description(params: RunParameters) -> dict[str, str]:
    """Backend provenance, and the versions of the platform's packages and of every package the
    backend's distribution depends on (its framework), logged as params so runs can be compared on them."""
    info = registry.backend_info(params.backend)
    described = {
        "backend.distribution": info.distribution,
        "backend.version": info.version,
        "backend.entry_point": info.target,
        "python": platform.python_version(),
    }
    for package in dict.fromkeys((*_PLATFORM_PACKAGES, *info.requires)):
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
    # The precision is recorded once the training device is known (see train).
    extras = training.model_dump(exclude={*TRAINING_VALUES, "seed", "precision"})
    layers = {"conv_filters": ",".join(str(block.filters) for block in model.conv_layers)}
    layers |= {"batch_norm": model.batch_norm, "dropout": model.dropout}
    return {f"train.{key}": value for key, value in extras.items()} | {f"model.{k}": v for k, v in layers.items()}


def model_params(params: RunParameters, training: TrainConfig) -> dict[str, object]:
    """What made a logged model, as its own params (the experiment's Models tab compares models on them):
    the backend, the network and how it was trained, down to the precision the training device settled."""
    model = params.model()
    chosen = {*TRAINING_VALUES, "seed"}
    # Named as the run names them (train.lr_schedule...), so the Models tab and the runs table line up.
    trained = {name if name in chosen else f"train.{name}": value for name, value in training.model_dump().items()}
    return (
        {"backend": params.backend, "architecture": model.architecture, "model.parameters": model.parameter_count()}
        | trained
        | {"validation_fraction": params.validation_fraction, "sample_limit": params.sample_limit, "test_limit": params.test_limit}
    )


def log_datasets(tracker: RunTracker, data: PreparedData) -> None:
    """Split sizes, and the datasets through MLflow's dataset API: source, and a digest of each (the split's
    for the training set; the test set's own, which the test metrics and the registry name too)."""
    tracker.log_params({f"data.{key}": value for key, value in data.summary().items()})
    sets = {"train": (data.x_train, data.y_train, data.digest), "test": (data.x_test, data.y_test, data.test_digest)}
    for context, (x, y, digest) in sets.items():
        tracker.log_dataset(x, y, name=dataset_name(context), source=data.source, digest=digest, context=context)


def dataset_name(context: str) -> str:
    """The name a run's ``context`` dataset ("train", "test") is logged under."""
    return f"fashion-mnist-{context}"


def log_test_metrics(tracker: RunTracker, metrics: dict[str, float], *, step: int, model_uri: str | None, data: PreparedData) -> None:
    """The test metrics, as the run's and as its logged model's scores on the test set (MLflow's model pages)."""
    tracker.log_metrics(metrics, step=step, model_uri=model_uri, dataset=(dataset_name("test"), data.test_digest))


def _read_progress(checkpoint: Path) -> list[EpochMetrics]:
    progress = checkpoint / _PROGRESS_FILE
    if not progress.is_file():
        return []
    return [EpochMetrics(**item) for item in json.loads(progress.read_text())]


def _write_progress(checkpoint: Path, epochs: list[EpochMetrics]) -> None:
    tmp = checkpoint / (_PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps([e.__dict__ for e in epochs]))
    tmp.replace(checkpoint / _PROGRESS_FILE)


class TrainingDiverged(ExpectedFailure, ArithmeticError):
    """The training loss stopped being a number (or blew up past :data:`DIVERGED_LOSS`): the weights are
    lost, and no later epoch brings them back. Deterministic from the same checkpoint, so the train task
    does not retry it. Names the run and the epoch, so that a sweep can rank the trial as diverged."""

    def __init__(self, message: str, run_id: str = "", epoch: int = 0) -> None:
        super().__init__(message)
        self.run_id, self.epoch = run_id, epoch

    def __reduce__(self) -> tuple[Any, ...]:  # a trial's failure crosses processes on Ray
        return (type(self), (str(self), self.run_id, self.epoch))


#: An epoch's mean cross-entropy above this is logits blown up, not learning: the right class had a
#: probability below e**-1e6 (a learning rate of 1000 gave 2.3e17 and a model answering one class).
DIVERGED_LOSS = 1e6


def diverged(metrics: EpochMetrics) -> bool:
    """The epoch's training loss is NaN, infinite or beyond :data:`DIVERGED_LOSS`: the weights it left are no model."""
    return not math.isfinite(metrics.loss) or metrics.loss > DIVERGED_LOSS


def train(
    params: RunParameters,
    data: PreparedData,
    tracker: RunTracker,
    *,
    device: str,
    on_epoch: Callable[[EpochMetrics], bool | None] | None = None,
) -> TrainOutcome:
    """Train (resuming from the run's checkpoint when an earlier attempt saved epochs), log every epoch
    as it ends, then log the finished model. Only a completed training is logged as the model.

    ``on_epoch`` may return True to stop after that epoch (the backend contract's stop request): the
    training then ends there, with ``stopped_at_epoch`` set and no model logged. An epoch whose loss is
    not a number is logged and shown to ``on_epoch`` (its progress line), then stops the training
    whatever ``on_epoch`` answers (:class:`TrainingDiverged`); the run's checkpoint goes, so nothing
    resumes from it."""
    model_config = params.model()
    training, why = resolve_precision(params.training(), device)
    tracker.log_params({"train.precision": training.precision, "train.precision_reason": why})
    checkpoint = checkpoint_dir(tracker.run_id)
    backend = registry.load_backend(params.backend)
    done = _read_progress(checkpoint)
    if done:
        backend.load(checkpoint / "weights", model_config, device=device)
        # An attempt can die between saving an epoch and logging it; log what MLflow lacks.
        logged = set(tracker.logged_steps("val_accuracy"))
        for metrics in done:
            if metrics.epoch not in logged:
                tracker.log_epoch(metrics)
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
        checkpoint.mkdir(parents=True)
        backend.build(model_config, device=device, seed=params.seed)

    epochs = list(done)
    stop_asked: list[int] = []
    nan_epochs: list[EpochMetrics] = []

    def finished_epoch(metrics: EpochMetrics) -> bool:
        # A trial's interruption waits for the epoch's records (interrupts.py).
        with deferred():
            if diverged(metrics):
                tracker.log_epoch(metrics)  # the UI's loss curve shows where it went
                nan_epochs.append(metrics)
                if on_epoch is not None:
                    on_epoch(metrics)
                return True
            # Checkpoint first: a retry then resumes after this epoch and re-logs it if needed.
            backend.save(checkpoint / "weights")
            epochs.append(metrics)
            _write_progress(checkpoint, epochs)
            tracker.log_epoch(metrics)
            stop = bool(on_epoch is not None and on_epoch(metrics))
            if stop and not stop_asked:
                stop_asked.append(metrics.epoch)
            return stop

    with interruptible():  # a trial stopped with its flow run stops here (interrupts.py)
        history = backend.train(data.train_data(), training, on_epoch=finished_epoch, initial_epoch=len(done))
    if nan_epochs:
        discard_checkpoint(tracker.run_id)  # resuming from its last good epoch would diverge again
        raise TrainingDiverged(
            f"training diverged: the training loss was {nan_epochs[0].loss:.3g} in epoch {nan_epochs[0].epoch} of "
            f"{params.epochs}, so the model is not logged; lower the learning rate (learning_rate "
            f"{training.learning_rate:g}, batch_size {training.batch_size})",
            run_id=tracker.run_id,
            epoch=nan_epochs[0].epoch,
        )
    last = stop_asked[0] if stop_asked else params.epochs
    if [m.epoch for m in epochs] != list(range(1, last + 1)):
        why = f"on_epoch asked it to stop after epoch {last}, " if stop_asked else ""
        raise BackendOutputError(
            f"backend {params.backend!r} reported epochs {[m.epoch for m in epochs]} through on_epoch, "
            f"{why}expected 1..{last}; the model is not logged"
        )
    stopped_at = last if last < params.epochs else None
    # Two images: a batch of one would let PyTorch's exporter fix the batch size at 1. A copy: on Ray
    # the arrays are read-only views of the object store, which torch.from_numpy warns about.
    example = data.x_val[:2].copy()
    parameters = backend.parameter_count()
    check_returned(params.backend, ("train", history, TrainHistory), ("parameter_count", parameters, int))
    if stopped_at is None:  # a model that breaks the contract is refused before it is logged
        check_probabilities(params.backend, np.asarray(backend.predict_proba(example)), len(example), model_config.num_classes)
        loggable = backend.loggable_model()
        check_returned(params.backend, ("loggable_model", loggable, LoggableModel))
    # A training stopped on request (a pruned trial) is not a model anyone will use: log none.
    model_uri = None if stopped_at is not None else tracker.log_model(
        loggable,
        ModelRecord(
            input_shape=model_config.input_shape,
            num_classes=model_config.num_classes,
            input_example=example,
            params=model_params(params, training),
        ),
    )
    trained = TrainHistory(tuple(epochs))
    # The run's speed as report.md and the Prefect tables give it (the per-epoch series' last point is the last epoch's).
    tracker.log_metrics(
        {"median_epoch_seconds": trained.seconds_per_epoch, "median_images_per_second": trained.images_per_second}, step=len(epochs)
    )
    return TrainOutcome(
        architecture=model_config.architecture,
        device=device,
        training=training,
        checkpoint=checkpoint,
        history=trained,
        parameters=int(parameters),
        model_uri=model_uri,
        resumed_from_epoch=len(done),
        stopped_at_epoch=stopped_at,
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
    # One pass over the test set: loss and accuracy come from the probabilities the report shows.
    with interruptible():
        probabilities = np.asarray(backend.predict_proba(data.x_test))
    check_probabilities(params.backend, probabilities, len(data.x_test), model_config.num_classes)
    evaluation = evaluation_of(probabilities, data.y_test)
    layers = [name for name, _ in model_config.feature_map_shapes()]
    maps = backend.feature_maps(data.x_test[:1], layers) if layers else {}
    kernels = backend.first_conv_kernels() if layers else None
    return EvalOutcome(evaluation, probabilities, maps, kernels)


class BackendOutputError(ExpectedFailure, RuntimeError):
    """A backend returned results that break the contract; the message names the backend and what, and
    the check that tells its author more. One line: the traceback would show only this check's frames."""


def check_returned(backend: str, *returns: tuple[str, object, type]) -> None:
    """Refuse a method's result of the wrong type, each ``(method, value, expected type)``: else it failed later,
    in the report or the model logging, as a traceback that never named the backend."""
    for method, value, expected in returns:
        _refuse(backend, returned_problem(method, value, expected))


def check_probabilities(backend: str, probabilities: np.ndarray, n: int, num_classes: int) -> None:
    """Refuse probabilities of the wrong shape or range before they reach MLflow or the report."""
    _refuse(backend, probabilities_problem(probabilities, n, num_classes))


def _refuse(backend: str, problem: str | None) -> None:
    """A contract breach the flow found, as the one line that names the backend and the check telling its author more."""
    if problem:
        raise BackendOutputError(
            f"backend {backend!r} broke the contract: {problem}. Check it with `cnn-train check-backend {backend}`"
        )


def evaluation_of(probabilities: np.ndarray, y: np.ndarray) -> Evaluation:
    """Mean cross-entropy and accuracy of class probabilities against labels (scikit-learn)."""
    labels = np.arange(probabilities.shape[1])
    with warnings.catch_warnings():
        # Its own float64 tolerance (1.5e-8) flags float32 rounding, e.g. a backend's probabilities as Python
        # floats; check_probabilities has refused rows off by more than PROBABILITY_SUM_TOLERANCE already.
        warnings.filterwarnings("ignore", "The y_prob values do not sum to one", UserWarning)
        loss = float(log_loss(y, probabilities, labels=labels))
    return Evaluation(
        loss=loss,
        accuracy=float(accuracy_score(y, probabilities.argmax(axis=1))),
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
