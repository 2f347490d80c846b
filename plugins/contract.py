"""The contract every training backend satisfies, and the typed results it returns.

Arrays crossing the contract are NumPy: images are float32 ``(n, height, width, channels)`` scaled to
[0, 1] (channels last, as the lesson feeds them), labels are int64 ``(n,)``. Backends convert to their
framework's layout internally. A device (``"cpu"``, ``"cuda:1"``) is chosen by placement and passed in.
Backends never talk to MLflow: they hand the flow a :class:`LoggableModel` instead.
"""

from __future__ import annotations

import numbers
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from cnn_train.plugins.config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class EpochMetrics:
    """What one finished epoch measured. ``epoch`` counts from 1."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class TrainHistory:
    """Every epoch of one ``train`` call, in order."""

    epochs: tuple[EpochMetrics, ...]

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]

    # The one definition of a run's speed, used by MLflow, report.md, Prefect tables, compare, sweep
    # and the benchmark: the median, so the first epoch's warm-up (kernel selection) does not skew it.
    @property
    def seconds_per_epoch(self) -> float:
        """Median wall-clock seconds of the recorded epochs."""
        return float(np.median([epoch.seconds for epoch in self.epochs]))

    @property
    def images_per_second(self) -> float:
        """Median training throughput of the recorded epochs."""
        return float(np.median([epoch.images_per_second for epoch in self.epochs]))


@dataclass(frozen=True)
class Evaluation:
    """Mean loss and accuracy over a labelled set."""

    loss: float
    accuracy: float


@dataclass(frozen=True)
class LoggableModel:
    """A trained model and how MLflow should save it; the tracking code logs it, the backend never does.

    The tracking code logs it into the run with ``mlflow.models.Model.log`` (the call behind every
    ``mlflow.<flavor>.log_model``, and the one that takes a run id): ``flavor=mlflow.<flavor>``, the
    model as below, ``pip_requirements`` (inferred by MLflow, slowly, when empty), a float32 tensor
    signature ``(-1, height, width, channels)`` in and ``(-1, num_classes)`` out, the flow's input
    example (two validation images) unless ``accepts_input_example`` is False, and ``**extra``.

    Two routes:

    - **An MLflow flavor** (``"pytorch"``, ``"keras"``, ``"sklearn"``...): ``flavor`` names the
      ``mlflow.<flavor>`` module and ``model`` is passed as its model argument (the first parameter
      of ``mlflow.<flavor>.save_model``: ``pytorch_model``, ``model``, ``sk_model``...).
    - **Any other framework** (JAX, Flax, NumPy, your own): ``flavor="pyfunc"`` and ``model`` an
      ``mlflow.pyfunc.PythonModel`` instance, passed as ``python_model``. Its
      ``predict(context, model_input: np.ndarray, params=None)`` gets the float32 batch as a NumPy
      array (MLflow reads that type hint: no schema is inferred from it, the signature above applies)
      and returns the probabilities. ``artifacts`` maps names to local files it needs (weights,
      vocabularies), which must exist when the flow logs the model; MLflow copies them into the model
      and hands them to ``load_context`` as ``context.artifacts[name]``. MLflow pickles the instance
      with cloudpickle, by reference to its class, so the class's module must import where the model
      is loaded: ship its package with ``extra={"code_paths": [package_dir]}`` (MLflow copies it into
      the model and puts it on ``sys.path`` when loading), keeping that package's ``__init__`` and
      the model's module free of cnn_train imports, or install the package there.

    A ``flavor`` with no ``mlflow.<flavor>`` model module, a pyfunc ``model`` that is not a
    ``PythonModel``, or ``artifacts`` with a flavor other than pyfunc is refused before anything is
    logged, with a message naming the problem and these routes. Either way, the model loaded with
    ``mlflow.pyfunc.load_model`` must map a float32 batch ``(n, height, width, channels)`` to class
    probabilities ``(n, num_classes)``, the ones ``predict_proba`` gives: the kit's ``model_logging``
    check logs it through the tracking code and compares.
    """

    flavor: str
    model: Any
    pip_requirements: tuple[str, ...] = ()
    #: Whether the flavor can log an input example (mlflow.keras cannot: MLflow issue #16183).
    #: PyTorch's default ``pt2`` format needs one to trace the graph.
    accepts_input_example: bool = True
    #: Further keyword arguments for ``Model.log``, which hands the ones it does not take itself to
    #: the flavor's ``save_model``: e.g. sklearn's ``pyfunc_predict_fn`` and ``skops_trusted_types``.
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``flavor="pyfunc"`` only: files the PythonModel needs, by name (``{"weights": "/path/w.npz"}``).
    artifacts: dict[str, str] = field(default_factory=dict)


#: Called as each epoch ends. A truthy return asks to stop after this epoch (a pruned trial); None or False goes on.
EpochCallback = Callable[[EpochMetrics], bool | None]


@dataclass(frozen=True)
class TrainData:
    """Training and validation arrays, already scaled to [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


class BackendInputError(ValueError):
    """Data handed to a backend does not fit the model (shape, emptiness, label range)."""


@runtime_checkable
class Backend(Protocol):
    """A training framework behind one name. Constructed with no arguments; does no work until ``build``.

    The lifecycle is ``build`` (or ``load``), then any of ``train``, ``evaluate``, ``predict_proba``,
    ``feature_maps``, ``first_conv_kernels``, ``save``, ``loggable_model``.
    """

    #: The ``flavor`` of this backend's :class:`LoggableModel`: an MLflow flavor module's name, or
    #: ``"pyfunc"`` for a framework MLflow has no flavor for.
    mlflow_flavor: ClassVar[str]
    #: Architectures (``ModelConfig.architecture`` values) this backend can build.
    architectures: ClassVar[tuple[str, ...]]

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        """Create a freshly initialised model for ``config`` on ``device``; same seed, same weights.

        Raises ValueError when ``config.architecture`` is not in ``architectures`` or the device
        is one this backend cannot use."""
        ...

    def parameter_count(self) -> int:
        """Trainable parameters of the built model."""
        ...

    def train(
        self,
        data: TrainData,
        config: TrainConfig,
        *,
        on_epoch: EpochCallback | None = None,
        initial_epoch: int = 0,
    ) -> TrainHistory:
        """Train for epochs ``initial_epoch + 1 .. config.epochs``, calling ``on_epoch`` as each one ends.

        When ``on_epoch`` returns something truthy for epoch k, the backend finishes that epoch and
        returns, training no epoch after k: the history then ends at k. ``initial_epoch`` is the last
        epoch an earlier ``train`` completed before ``save``; after ``load``, training resumes exactly
        where it stopped (same shuffles, optimizer state restored)."""
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        """Mean cross-entropy loss and accuracy on ``(x, y)``."""
        ...

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities ``(n, num_classes)``; each row sums to 1."""
        ...

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Activations of the named layers (``conv1``, ``pool1``, ...) for a batch, channels last."""
        ...

    def first_conv_kernels(self) -> np.ndarray:
        """Weights of the first convolution as ``(kernel_h, kernel_w, in_channels, filters)``."""
        ...

    def save(self, path: Path) -> None:
        """Write model weights (and optimizer state, so training can resume) under directory ``path``."""
        ...

    def load(self, path: Path, config: ModelConfig, *, device: str) -> None:
        """Rebuild the model for ``config`` on ``device`` from what ``save`` wrote."""
        ...

    def loggable_model(self) -> LoggableModel:
        """The model as its framework's MLflow flavor expects it, outputting probabilities."""
        ...


#: Methods every backend must provide; the registry checks each one's parameters against the protocol's.
CONTRACT_METHODS: tuple[str, ...] = (
    "build",
    "parameter_count",
    "train",
    "evaluate",
    "predict_proba",
    "feature_maps",
    "first_conv_kernels",
    "save",
    "load",
    "loggable_model",
)


#: Device strings a backend may be asked to build on: the CPU, or a CUDA device.
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_buildable(
    config: ModelConfig, device: str, architectures: Sequence[str], *, devices: Sequence[str] | None = None
) -> None:
    """What ``build`` refuses: an architecture not in ``architectures``, or a device outside ``devices``
    (by default any ``cpu`` or ``cuda:N``)."""
    if config.architecture not in architectures:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported here; supported: {', '.join(architectures)}"
        )
    if devices is not None and device not in devices:
        raise ValueError(f"device must be {' or '.join(map(repr, devices))} for this backend, got {device!r}")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be 'cpu' or 'cuda:N' (e.g. 'cuda:0'), got {device!r}")


def check_images(x: np.ndarray, config: ModelConfig, *, what: str = "images") -> None:
    """Refuse image batches unlike ``config.input_shape`` or not floats in [0, 1], saying what would do (raw
    0-255 pixels trained from a loss of 110 without a word, and NaN fails training and predictions alike)."""
    expected = tuple(config.input_shape)
    if not isinstance(x, np.ndarray):
        raise BackendInputError(f"{what} must be a NumPy array, got {type(x).__name__}")
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise BackendInputError(f"{what} must have shape (n, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise BackendInputError(f"{what} is empty: need at least one image")
    if x.dtype.kind != "f":
        raise BackendInputError(f"{what} must be floats in [0, 1] (pixels / 255), got {x.dtype} values")
    if missing := int(np.count_nonzero(np.isnan(x))):
        raise BackendInputError(f"{what} must be floats in [0, 1] (pixels / 255), got {missing:,} NaN value(s)")
    if not 0.0 <= (low := float(x.min())) <= (high := float(x.max())) <= 1.0:
        raise BackendInputError(f"{what} must be floats in [0, 1] (pixels / 255), got values from {low:g} to {high:g}")


def check_labels(y: np.ndarray, n: int, num_classes: int, *, what: str = "labels") -> None:
    """Refuse labels of the wrong length or outside ``[0, num_classes)``."""
    if y.ndim != 1 or y.shape[0] != n:
        raise BackendInputError(f"{what} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise BackendInputError(f"{what} must be whole class numbers (int64), got {y.dtype} values")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise BackendInputError(f"{what} must lie in [0, {num_classes - 1}], got values from {int(y.min())} to {int(y.max())}")



def returned_problem(method: str, value: object, expected: type) -> str | None:
    """``"parameter_count() returned str '12', expected int"``, or None (for int: any integer but a bool)."""
    if isinstance(value, numbers.Integral if expected is int else expected) and not isinstance(value, bool):
        return None
    return f"{method}() returned {type(value).__name__} {value!r:.60}, expected {expected.__name__}"


#: How far a row of ``predict_proba`` may sum from 1 (float32 softmax rounding is far smaller).
PROBABILITY_SUM_TOLERANCE = 1e-3


def probabilities_problem(probabilities: np.ndarray, n: int, num_classes: int, *, what: str = "predict_proba") -> str | None:
    """What makes ``probabilities`` (from ``what``) not class probabilities for ``n`` images, with the
    figures seen, or None: shape ``(n, num_classes)``, finite, non-negative, rows summing to 1."""
    got = np.asarray(probabilities)
    if got.shape != (n, num_classes):
        return f"{what} returned shape {got.shape} for {n} images, expected ({n}, {num_classes})"
    bad = int(np.count_nonzero(~np.isfinite(got)))
    if bad:
        return f"{what} returned {bad} values that are NaN or infinite; expected probabilities"
    if got.size and got.min() < 0:
        return f"{what} returned negative values (down to {got.min():.4g}); expected probabilities"
    sums = got.astype(np.float64).sum(axis=1)
    if sums.size and np.abs(sums - 1.0).max() > PROBABILITY_SUM_TOLERANCE:
        return (
            f"the rows {what} returned sum to {sums.min():.4g}..{sums.max():.4g}, expected 1 (within "
            f"{PROBABILITY_SUM_TOLERANCE:g}): end the network with a softmax"
        )
    return None

#: TrainConfig options beyond the lesson's plain training (constant rate, no augmentation, no label smoothing,
#: float32). A backend that does not implement them calls :func:`check_plain_training`.
PLAIN_TRAINING: tuple[str, ...] = ("lr_schedule", "augment", "label_smoothing", "precision")


def check_plain_training(config: TrainConfig, backend: str, *, implemented: Sequence[str] = ()) -> None:
    """Refuse training options ``backend`` does not implement, rather than train otherwise than the run records.

    ``implemented`` names the options of :data:`PLAIN_TRAINING` the backend does implement; those may take
    any value but ``precision="auto"``, which the flow resolves for the training device first."""
    if config.precision == "auto":
        raise BackendInputError(
            f"{backend} got precision='auto', which the flow resolves for the training device "
            "before training; pass 'float32' or 'bfloat16'"
        )
    plain = TrainConfig()
    asked = {
        name: value
        for name in PLAIN_TRAINING
        if name not in implemented and (value := getattr(config, name)) != getattr(plain, name)
    }
    if asked:
        wanted = ", ".join(f"{name}={value!r}" for name, value in asked.items())
        allowed = ", ".join(f"{name}={getattr(plain, name)!r}" for name in PLAIN_TRAINING)
        raise BackendInputError(f"{backend} trains only as the lesson does ({allowed}); got {wanted}")


def check_train_data(data: TrainData, config: ModelConfig) -> None:
    """Refuse training or validation arrays that do not fit ``config`` before any work starts."""
    check_images(data.x_train, config, what="training images")
    check_labels(data.y_train, data.x_train.shape[0], config.num_classes, what="training labels")
    check_images(data.x_val, config, what="validation images")
    check_labels(data.y_val, data.x_val.shape[0], config.num_classes, what="validation labels")


@dataclass(frozen=True)
class Training:
    """One ``train`` call that :class:`BackendBase` has checked: what its ``fit`` trains."""

    data: TrainData
    config: TrainConfig
    on_epoch: EpochCallback | None = None
    #: The last epoch an earlier ``train`` completed; this call trains ``initial_epoch + 1 .. config.epochs``.
    initial_epoch: int = 0

    def stop_after(self, metrics: EpochMetrics) -> bool:
        """Hand a finished epoch to ``on_epoch``; True when the caller asks to stop after it."""
        return self.on_epoch is not None and bool(self.on_epoch(metrics))

    def run_epochs(
        self, train_epoch: Callable[[int], tuple[float, float]], validate: Callable[[], Evaluation]
    ) -> TrainHistory:
        """The epoch loop most backends write: ``train_epoch(epoch)`` trains one epoch and returns its mean
        loss and accuracy, ``validate()`` scores the validation set; each epoch is timed (images per second
        over training alone, seconds including validation), handed to ``on_epoch``, and the loop stops
        after any epoch the caller asks it to."""
        images = len(self.data.x_train)
        epochs = []
        for epoch in range(self.initial_epoch + 1, self.config.epochs + 1):
            started = time.perf_counter()
            loss, accuracy = train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            validation = validate()
            if problem := returned_problem("run_epochs' validate", validation, Evaluation):
                raise TypeError(problem)  # else an AttributeError on .loss, blamed on the caller's line
            metrics = EpochMetrics(
                epoch=epoch, loss=float(loss), accuracy=float(accuracy), val_loss=validation.loss,
                val_accuracy=validation.accuracy, seconds=time.perf_counter() - started, images_per_second=images / train_seconds,
            )
            epochs.append(metrics)
            if self.stop_after(metrics):
                break
        return TrainHistory(epochs=tuple(epochs))


class BackendBase(ABC):
    """An optional base class for a :class:`Backend`: ``train`` with its checks written once.

    A subclass implements ``fit`` and ``built_config`` instead of ``train``, and the protocol's other
    methods as usual. ``train`` refuses, before any work starts: data that does not fit the built model
    (:func:`check_train_data`), a negative ``initial_epoch``, and any option of :data:`PLAIN_TRAINING`
    outside ``training_options`` set otherwise than the lesson does (:func:`check_plain_training`).
    """

    #: The options of :data:`PLAIN_TRAINING` this backend implements; the others must keep the lesson's values.
    training_options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def built_config(self) -> ModelConfig:
        """The config of the built (or loaded) model; RuntimeError when there is none yet."""

    @abstractmethod
    def fit(self, training: Training) -> TrainHistory:
        """Train as :meth:`Backend.train` describes, on inputs ``train`` has checked."""

    # Backend.train (declared above), implemented for every subclass.
    def train(self, data: TrainData, config: TrainConfig, *, on_epoch: EpochCallback | None = None, initial_epoch: int = 0) -> TrainHistory:  # noqa: E501
        """:meth:`Backend.train`: check the call, then ``fit``."""
        check_train_data(data, self.built_config())
        if initial_epoch < 0:
            raise ValueError(f"initial_epoch must be >= 0, got {initial_epoch}")
        check_plain_training(config, type(self).__name__, implemented=self.training_options)
        return self.fit(Training(data, config, on_epoch, initial_epoch))
