"""The Keras 3 backend: the ModelConfig network as a Keras model, trained by ``model.fit`` on the torch backend.

Keras must be told its backend before it is first imported: :mod:`cnn_train.backends.keras_direct`,
imported first, fixes it to torch. Training goes through ``fit`` with a callback that forwards every
epoch, so Keras callbacks and metrics behave as any Keras user expects; that module's fast path only
trims Keras's per-step Python.

The model takes the contract's NHWC images and permutes them once to channels-first, the layout
whose convolutions and pools run natively in PyTorch (channels-last Keras layers transpose around
every op on the torch backend, measured about 5x slower per training step here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cnn_train.backends import _common as common
from cnn_train.backends.keras_direct import DirectSequential, EpochCallbacks, FusedAdam, keras
from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import (
    BackendBase, EpochCallback, EpochMetrics, Evaluation, LoggableModel, TrainHistory, Training,
    check_buildable, check_images,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
#: keras.utils.set_random_seed seeds process-wide state (Python's, NumPy's, torch's and Keras's own
#: generators): two builds in threads at once (a sweep's trials) would draw each other's weights.
_SEEDED_BUILD = threading.Lock()


class EpochShuffle(torch.utils.data.Sampler[int]):
    """The order of an epoch's training images, from the run's seed and the epoch alone.

    It is the order Keras's own array input gave when torch's global generator was seeded per epoch
    (each epoch's ``DataLoader`` iterator drew its base seed from it, then its ``RandomSampler`` the
    seed of a generator of its own), so runs keep their numerics; but another trial's thread reseeding
    or drawing from the global generator cannot change it, and fit no longer moves that generator."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 1

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # A generator: the epoch is read when the first batch is drawn, after fit's on_epoch_begin.
        epoch = torch.Generator().manual_seed(common.epoch_seed(self.seed, self.epoch))

        def draw() -> int:
            return int(torch.empty((), dtype=torch.int64).random_(generator=epoch).item())

        draw()  # the DataLoader iterator's base seed
        sampler_seed = draw()
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(sampler_seed)).tolist()


class Arrays(torch.utils.data.Dataset):
    """Images (and labels, when there are any) served a batch at a time, as Keras's array input serves
    them: one fancy index into each array, converted on the Keras device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.images = np.asarray(images, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> tuple[Any, ...]:
        convert = keras.ops.convert_to_tensor
        if self.labels is None:
            return (convert(self.images[indices]),)
        return convert(self.images[indices]), convert(self.labels[indices])


def batches(arrays: Arrays, *, batch_size: int, shuffle: EpochShuffle | None = None) -> torch.utils.data.DataLoader:
    """Input for ``fit``, ``evaluate`` and ``predict``: ``arrays`` in batches, in ``shuffle``'s order or as
    they are. Keras's own array input would draw each pass's DataLoader seed from torch's global generator."""
    return torch.utils.data.DataLoader(
        arrays,
        batch_size=batch_size,
        sampler=shuffle,
        collate_fn=lambda batch: batch,  # __getitems__ returns whole batches
        generator=torch.Generator(),  # the base seed each iterator draws, not from torch's global generator
    )


class EpochReporter(keras.callbacks.Callback):
    """Turns each finished ``fit`` epoch into :class:`EpochMetrics` and hands it on at once; stops ``fit``
    when the callback asks to."""

    def __init__(self, *, shuffle: EpochShuffle, on_epoch: EpochCallback | None) -> None:
        super().__init__()
        self.epochs: list[EpochMetrics] = []
        self._shuffle = shuffle
        self._train_images = len(shuffle)
        self._on_epoch = on_epoch
        self._started = 0.0
        self._train_seconds: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._shuffle.epoch = epoch + 1  # fit draws the epoch's first batch just after this hook
        self._train_seconds = None
        self._started = time.perf_counter()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        # Validation starts: the training phase of the epoch is over.
        if self._train_seconds is None:
            self._train_seconds = time.perf_counter() - self._started

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        seconds = time.perf_counter() - self._started
        metrics = EpochMetrics(
            epoch=epoch + 1,
            loss=float(logs["loss"]),
            accuracy=float(logs["accuracy"]),
            val_loss=float(logs["val_loss"]),
            val_accuracy=float(logs["val_accuracy"]),
            seconds=seconds,
            images_per_second=self._train_images / (self._train_seconds or seconds),
        )
        self.epochs.append(metrics)
        if self._on_epoch is not None and self._on_epoch(metrics):
            self.model.stop_training = True  # Keras's own way to end fit after this epoch


def build_model(config: ModelConfig) -> DirectSequential:
    """The ModelConfig network, NHWC images in, logits out, with layers named as the feature maps."""
    layers = keras.layers
    stack: list[Any] = [keras.Input(shape=config.input_shape, name="images")]
    if config.conv_layers:
        stack.append(layers.Permute((3, 1, 2), name="to_channels_first"))
        for index, block in enumerate(config.conv_layers, start=1):
            stack.append(
                layers.Conv2D(
                    block.filters,
                    block.kernel_size,
                    strides=block.stride,
                    padding=block.padding,
                    activation="relu",
                    data_format="channels_first",
                    name=f"conv{index}",
                )
            )
            if block.pool_size:
                stack.append(
                    layers.MaxPooling2D(
                        block.pool_size,
                        strides=block.pool_stride or block.pool_size,
                        data_format="channels_first",
                        name=f"pool{index}",
                    )
                )
        # Flatten in (height, width, channels) order, as a channels-last model and the torch backend do.
        stack.append(layers.Flatten(data_format="channels_first", name="flatten"))
    else:
        stack.append(layers.Flatten(data_format="channels_last", name="flatten"))
    stack.append(layers.Dense(config.dense_units, activation="relu", name="hidden"))
    stack.append(layers.Dense(config.num_classes, name="logits"))
    return DirectSequential(stack, name=f"fashion_{config.architecture}")


class KerasBackend(BackendBase):
    """Trains the ModelConfig network with Keras 3 (torch backend) on the device it is given."""

    mlflow_flavor: ClassVar[str] = "keras"
    architectures: ClassVar[tuple[str, ...]] = common.ARCHITECTURES

    def __init__(self) -> None:
        self._config: ModelConfig | None = None
        self._device = "cpu"
        self._model: DirectSequential | None = None
        self._probabilities: keras.Sequential | None = None

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        check_buildable(config, device, self.architectures)
        common.keep_freed_memory()
        try:
            with _SEEDED_BUILD, keras.device(device):
                keras.utils.set_random_seed(seed)
                model = build_model(config)
        except (RuntimeError, AssertionError) as error:  # a CPU-only torch cannot place weights on CUDA
            raise common.unusable_device(device, error) from error
        with keras.device(device):
            model.compile_plain(FusedAdam())
            # Shares the layers (and so the weights) of the trained model; it is what gets logged.
            probabilities = keras.Sequential(
                [keras.Input(shape=config.input_shape, name="images"), *model.layers, keras.layers.Softmax()],
                name=f"fashion_{config.architecture}_probabilities",
            )
        self._model, self._probabilities, self._config, self._device = model, probabilities, config, device
        logger.debug("built %s network on %s", config.architecture, device)

    def parameter_count(self) -> int:
        model = self._built()
        return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)

    def built_config(self) -> ModelConfig:
        if self._config is None:
            raise RuntimeError(common.NOT_BUILT)
        return self._config

    def fit(self, training: Training) -> TrainHistory:
        model, data, config = self._built(), training.data, training.config
        model.optimizer.learning_rate.assign(config.learning_rate)
        shuffle = EpochShuffle(len(data.y_train), config.seed)
        reporter = EpochReporter(shuffle=shuffle, on_epoch=training.on_epoch)
        with keras.device(self._device):
            model.fit(
                batches(Arrays(data.x_train, data.y_train), batch_size=config.batch_size, shuffle=shuffle),
                epochs=config.epochs,
                initial_epoch=training.initial_epoch,
                validation_data=batches(Arrays(data.x_val, data.y_val), batch_size=common.INFERENCE_BATCH),
                shuffle=False,  # the batches come shuffled
                callbacks=EpochCallbacks([reporter, *self.keras_callbacks()], add_history=True, model=model, epochs=config.epochs),
                verbose=0,
            )
        return TrainHistory(epochs=tuple(reporter.epochs))

    def keras_callbacks(self) -> list[keras.callbacks.Callback]:
        """Keras callbacks of your own for every ``fit`` (none here): subclass this backend, return them, and
        register the subclass as a backend of its own. They get Keras's calls, batch hooks included."""
        return []

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        model = self._built()
        common.check_evaluation(x, y, self._config)
        with keras.device(self._device):
            result = model.evaluate(batches(Arrays(x, y), batch_size=batch_size), verbose=0, return_dict=True)
        return Evaluation(loss=float(result["loss"]), accuracy=float(result["accuracy"]))

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        self._built()
        check_images(x, self._config)
        with keras.device(self._device):
            probabilities = self._probabilities.predict(batches(Arrays(x), batch_size=batch_size), verbose=0)
        return np.asarray(probabilities, dtype=np.float32)

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        model = self._built()
        common.check_feature_request(self._config, x, layers)
        wanted = set(layers)
        deepest = max(index for index, layer in enumerate(model.layers) if layer.name in wanted)
        maps: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        with keras.device(self._device), torch.no_grad():
            for start in range(0, x.shape[0], common.INFERENCE_BATCH):
                activations = keras.ops.convert_to_tensor(np.asarray(x[start : start + common.INFERENCE_BATCH], dtype=np.float32))
                for layer in model.layers[: deepest + 1]:
                    activations = layer(activations)
                    if layer.name in wanted:
                        channels_last = keras.ops.transpose(activations, (0, 2, 3, 1))
                        maps[layer.name].append(keras.ops.convert_to_numpy(channels_last))
        return {name: np.ascontiguousarray(np.concatenate(parts)) for name, parts in maps.items()}

    def first_conv_kernels(self) -> np.ndarray:
        model = self._built()
        common.check_has_convolution(self._config)
        return np.array(keras.ops.convert_to_numpy(model.get_layer("conv1").kernel))

    def save(self, path: Path) -> None:
        self._built()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Keras writes the optimizer's variables with the model's, once they exist.
        self._built_optimizer()
        self._model.save_weights(path / WEIGHTS_FILE)

    def load(self, path: Path, config: ModelConfig, *, device: str) -> None:
        weights_file = Path(path) / WEIGHTS_FILE
        if not weights_file.is_file():
            raise FileNotFoundError(f"no Keras checkpoint at {weights_file}; was it written by KerasBackend.save?")
        self.build(config, device=device, seed=0)
        self._built_optimizer()
        with keras.device(self._device):
            self._model.load_weights(weights_file)

    def loggable_model(self) -> LoggableModel:
        self._built()
        return LoggableModel(
            flavor=self.mlflow_flavor,
            model=self._probabilities,
            pip_requirements=common.pinned("keras", "torch"),
            accepts_input_example=False,
        )

    def _built(self) -> DirectSequential:
        if self._model is None:
            raise RuntimeError(common.NOT_BUILT)
        return self._model

    def _built_optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer with its slot variables created, which Keras otherwise defers to the first step."""
        optimizer = self._model.optimizer
        if not optimizer.built:
            with keras.device(self._device):
                optimizer.build(self._model.trainable_variables)
        return optimizer
