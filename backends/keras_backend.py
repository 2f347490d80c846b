"""The Keras 3 backend: the ModelConfig network as a Keras model, trained by ``model.fit`` on the torch backend.

Keras must be told its backend before it is first imported, so this module fixes it to torch
(the framework this project installs) at import time, and refuses to run on a Keras that was
already imported with another backend. Training goes through ``fit`` with a callback that
forwards every epoch, so Keras callbacks and metrics behave as any Keras user expects.

The model takes the contract's NHWC images and permutes them once to channels-first, the layout
whose convolutions and pools run natively in PyTorch (channels-last Keras layers transpose around
every op on the torch backend, measured about 5x slower per training step here).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cnn_train.backends._common import (
    ARCHITECTURES,
    INFERENCE_BATCH,
    NOT_BUILT,
    check_buildable,
    check_has_convolution,
    check_initial_epoch,
    check_layer_names,
    check_train_data,
    epoch_seed,
    pinned,
    unusable_device,
)
from cnn_train.plugins.config import ModelConfig, TrainConfig
from cnn_train.plugins.contract import (
    EpochCallback,
    EpochMetrics,
    Evaluation,
    LoggableModel,
    TrainData,
    TrainHistory,
    check_images,
    check_labels,
    check_plain_training,
)

logger = logging.getLogger(__name__)

KERAS_BACKEND = "torch"

if "keras" not in sys.modules:
    if os.environ.get("KERAS_BACKEND", KERAS_BACKEND) != KERAS_BACKEND:
        logger.debug("overriding KERAS_BACKEND=%s with %s", os.environ["KERAS_BACKEND"], KERAS_BACKEND)
    os.environ["KERAS_BACKEND"] = KERAS_BACKEND

import keras  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if keras.backend.backend() != KERAS_BACKEND:
    raise RuntimeError(
        f"keras was already imported with the {keras.backend.backend()!r} backend, but the keras backend "
        f"of cnn-train needs {KERAS_BACKEND!r}: set KERAS_BACKEND={KERAS_BACKEND} before anything imports keras"
    )

WEIGHTS_FILE = "model.weights.h5"


def _activate(layer: Any, outputs: torch.Tensor) -> torch.Tensor:
    activation = layer.activation
    if activation is keras.activations.relu:
        return torch.relu(outputs)
    if activation is None or activation is keras.activations.linear:
        return outputs
    return activation(outputs)


def _plain(layer: Any) -> bool:
    """True when a conv or dense layer computes a plain float32 affine map (no LoRA, no quantization)."""
    return (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == "float32"
    )


def _torch_op(layer: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's ``call`` as one fused torch op on its own Keras variables, or None when not exactly known.

    Why: Keras's torch ops convert and check every argument, permute the conv kernel and add the bias as
    separate ops, so each layer costs several extra ops forward and backward. ``conv2d`` and ``linear``
    with the bias fused in, on the very same variables, cut a training step here by about 10%.
    Only cases whose result is the same as ``layer.call`` are covered: channels-first convolutions with
    'valid' padding, or 'same' padding with odd kernels and stride 1 (symmetric, as Keras pads it then).
    """
    layers = keras.layers
    if type(layer) is layers.Conv2D and _plain(layer):
        odd_kernel = all(size % 2 for size in layer.kernel_size)
        same_ok = layer.padding == "same" and odd_kernel and layer.strides == (1, 1)
        if layer.data_format != "channels_first" or layer.groups != 1 or layer.dilation_rate != (1, 1):
            return None
        if layer.padding != "valid" and not same_ok:
            return None
        padding = tuple(size // 2 for size in layer.kernel_size) if same_ok else 0

        def conv(inputs: torch.Tensor) -> torch.Tensor:
            # Keras kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
            kernel = layer.kernel.value.permute(3, 2, 0, 1)
            bias = layer.bias.value if layer.use_bias else None
            return _activate(layer, F.conv2d(inputs, kernel, bias, layer.strides, padding))

        return conv
    if type(layer) is layers.MaxPooling2D:
        if layer.data_format != "channels_first" or layer.padding != "valid":
            return None
        return lambda inputs: F.max_pool2d(inputs, layer.pool_size, layer.strides)
    if type(layer) is layers.Dense and _plain(layer):

        def dense(inputs: torch.Tensor) -> torch.Tensor:
            bias = layer.bias.value if layer.use_bias else None
            return _activate(layer, F.linear(inputs, layer.kernel.value.T, bias))

        return dense
    if type(layer) is layers.Permute:
        return lambda inputs: inputs.permute(0, *layer.dims)
    if type(layer) is layers.Flatten:
        if layer.data_format == "channels_first":
            return lambda inputs: torch.flatten(torch.movedim(inputs, 1, -1), 1) if inputs.ndim > 2 else inputs
        return lambda inputs: torch.flatten(inputs, 1) if inputs.ndim > 1 else inputs.reshape(-1, 1)
    return None


@keras.saving.register_keras_serializable(package="cnn_train")
class DirectSequential(keras.Sequential):
    """A Sequential whose eager forward pass skips Keras's per-layer and per-op machinery.

    ``Layer.__call__`` costs about 0.1 ms per layer on the torch backend (symbolic-tensor checks,
    dtype policy, masking), and each Keras op converts and checks its arguments again; this small
    network is dominated by such overhead. So the eager pass calls, per layer, an equivalent fused
    torch op on the layer's own variables (see :func:`_torch_op`), or else the layer's ``call``. These
    layers need none of the skipped machinery: they are built, float32, take no mask and behave the
    same in training and inference. Symbolic calls, which build the graph, take the normal path.
    ``fit``, its ``train_step``, the compiled loss and metrics, the optimizer and callbacks are Keras's.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None, **kwargs: Any) -> Any:
        if keras.backend.is_keras_tensor(inputs):
            return super().call(inputs, training=training, mask=mask, **kwargs)
        outputs = inputs
        for op in self._direct_ops():
            outputs = op(outputs)
        return outputs

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """Keras's documented hook for the loss, short-cut when the compiled loss is plain cross-entropy.

        Why: the compiled-loss wrappers (structure checks, casts, reduction) cost about 0.4 ms a step
        against 0.05 ms for torch's own op, a few percent of a training step of this network. When the
        model was compiled by :meth:`compile_plain` (mean sparse cross-entropy on logits over the last
        axis) and nothing else contributes (no sample weights, no layer losses), torch's
        ``cross_entropy`` is that loss; anything else goes through Keras as usual.
        """
        plain_loss = self.__dict__.get("_plain_loss")
        if (
            plain_loss is not None
            and self.loss is plain_loss
            and sample_weight is None
            and isinstance(y_pred, torch.Tensor)
            and y_pred.ndim == 2
            and isinstance(y, torch.Tensor)
            and y.ndim == 1
            and not self.losses
        ):
            return F.cross_entropy(y_pred, y.long())
        return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    def train_step(self, data: Any) -> Any:
        """Keras's torch training step for a model compiled by :meth:`compile_plain`, with less Python per step.

        Why: a batch-32 step of this network takes a few milliseconds, and Keras's generic step (the
        model's own ``Layer.__call__``, the compiled loss and metric wrappers, metric results through Keras
        ops) added about a third to it. Overriding ``train_step`` is Keras's documented way to change a step
        (keras.io, "Customizing what happens in fit() with PyTorch"): this one makes the same forward pass,
        loss, ``backward`` and ``self.optimizer.apply`` as Keras's own, and adds to the loss tracker and the
        compiled accuracy the same sums Keras's ``update_state`` would. Anything else (another loss or metric,
        sample or class weights) takes Keras's own step.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        running = _PlainMetrics.of(self) if self._compiled_plain() and sample_weight is None else None
        if running is None or not isinstance(y, torch.Tensor) or y.ndim != 1:
            return super().train_step(data)
        self.zero_grad()
        logits = self.call(x, training=True)
        loss = F.cross_entropy(logits, y.long())
        self.optimizer.scale_loss(loss).backward()
        weights = self.trainable_weights
        with torch.no_grad():
            self.optimizer.apply([weight.value.grad for weight in weights], weights)
            return running.update(loss, logits, y)

    def _compiled_plain(self) -> bool:
        plain_loss = self.__dict__.get("_plain_loss")
        return plain_loss is not None and self.loss is plain_loss and not self.losses

    def compile_plain(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Compile with mean sparse cross-entropy on logits and accuracy, the loss :meth:`compute_loss` short-cuts.

        The loss is known by identity rather than read back from its settings: Keras does not expose a
        cross-entropy's axis (``get_config`` leaves it out).
        """
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        # In __dict__, out of Keras's attribute tracking, like the ops cache below.
        self.__dict__["_plain_loss"] = loss

    def _direct_ops(self) -> tuple[Callable[[Any], Any], ...]:
        # Cached in __dict__ (not as a tracked attribute), and rebuilt if the layer list ever changes.
        layers = tuple(self.layers)
        cached = self.__dict__.get("_direct_ops_cache")
        if cached is None or cached[0] != tuple(map(id, layers)):
            ops = tuple(_torch_op(layer) or layer.call for layer in layers)
            cached = self.__dict__["_direct_ops_cache"] = (tuple(map(id, layers)), ops)
        return cached[1]


class _PlainMetrics:
    """The state of a plain model's loss tracker and compiled accuracy, updated with torch ops in place.

    Keras's ``Mean.update_state`` adds ``loss x batch`` and ``batch`` to the loss tracker's total and count;
    ``sparse_categorical_accuracy`` wrapped in a Mean adds the number of correct predictions and ``batch``.
    These are the same sums, made on the metrics' own variables (``Variable.value`` is the torch tensor,
    as Keras's torch optimizers update it), so ``model.metrics``, epoch logs and callbacks see Keras's values.
    """

    def __init__(self, loss: Any, accuracy: Any) -> None:
        self._loss_total, self._loss_count = loss.total.value, loss.count.value
        self._hits, self._seen = accuracy.total.value, accuracy.count.value
        self._names = (loss.name, accuracy.name)

    @classmethod
    def of(cls, model: keras.Model) -> _PlainMetrics | None:
        """The model's metrics when they are exactly the loss tracker and one built accuracy metric."""
        tracker, *compiled = model.metrics
        inner = compiled[0].metrics if len(compiled) == 1 and hasattr(compiled[0], "metrics") else []
        if not (type(tracker) is keras.metrics.Mean and len(inner) == 1 and inner[0].name == "accuracy"):
            return None
        accuracy = inner[0]
        if not (isinstance(accuracy, keras.metrics.MeanMetricWrapper) and accuracy.get_config().get("name") == "accuracy"):
            return None
        cached = model.__dict__.get("_plain_metrics_cache")
        if cached is None or cached[0] != (id(tracker), id(accuracy)):
            cached = model.__dict__["_plain_metrics_cache"] = ((id(tracker), id(accuracy)), cls(tracker, accuracy))
        return cached[1]

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add one batch; returns the running means as Keras's step would (``{"loss": ..., "accuracy": ...}``)."""
        count = labels.shape[0]
        self._loss_total.add_(loss.detach() * count)
        self._loss_count.add_(count)
        self._hits.add_((logits.argmax(dim=-1) == labels).sum())
        self._seen.add_(count)
        return {
            self._names[0]: self._loss_total / self._loss_count,
            self._names[1]: self._hits / self._seen,
        }


class EpochCallbacks(keras.callbacks.CallbackList):
    """Keras's callback list, minus batch hooks that no callback in it implements.

    Why: ``CallbackList`` calls every batch hook whether or not a callback defines it, and hands each
    ``on_train_batch_end`` to a thread pool that turns the step's logs into floats: per step, a thread
    wake-up that competes with the training's own threads for two cores. When no callback in the list
    overrides a batch hook (ours act at epoch ends), that hook is skipped; a callback that does
    override one gets every call as usual.
    """

    _BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_test_batch_begin", "on_test_batch_end")

    def __init__(self, callbacks: list[keras.callbacks.Callback], **kwargs: Any) -> None:
        super().__init__(callbacks, **kwargs)
        self._used_hooks = {
            hook
            for hook in self._BATCH_HOOKS
            for callback in self.callbacks
            if getattr(type(callback), hook) is not getattr(keras.callbacks.Callback, hook)
        }

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if "on_train_batch_begin" in self._used_hooks:
            super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if "on_train_batch_end" in self._used_hooks:
            super().on_train_batch_end(batch, logs)

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if "on_test_batch_begin" in self._used_hooks:
            super().on_test_batch_begin(batch, logs)

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if "on_test_batch_end" in self._used_hooks:
            super().on_test_batch_end(batch, logs)


class EpochReporter(keras.callbacks.Callback):
    """Turns each finished ``fit`` epoch into :class:`EpochMetrics` and hands it on at once; stops ``fit``
    when the callback asks to."""

    def __init__(self, *, seed: int, train_images: int, on_epoch: EpochCallback | None) -> None:
        super().__init__()
        self.epochs: list[EpochMetrics] = []
        self._seed = seed
        self._train_images = train_images
        self._on_epoch = on_epoch
        self._started = 0.0
        self._train_seconds: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # fit shuffles arrays with torch's global generator as the epoch's first batch is drawn,
        # just after this hook: seeding it per epoch makes a resumed run shuffle like an unbroken one.
        torch.manual_seed(epoch_seed(self._seed, epoch + 1))
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


class KerasBackend:
    """Trains the ModelConfig network with Keras 3 (torch backend) on the device it is given."""

    mlflow_flavor: ClassVar[str] = "keras"
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES

    def __init__(self) -> None:
        self._config: ModelConfig | None = None
        self._device = "cpu"
        self._model: DirectSequential | None = None
        self._probabilities: keras.Sequential | None = None

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        check_buildable(config, device, self.architectures)
        keras.utils.set_random_seed(seed)
        try:
            with keras.device(device):
                model = build_model(config)
        except (RuntimeError, AssertionError) as error:  # a CPU-only torch cannot place weights on CUDA
            raise unusable_device(device, error) from error
        with keras.device(device):
            model.compile_plain(keras.optimizers.Adam())
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

    def train(
        self,
        data: TrainData,
        config: TrainConfig,
        *,
        on_epoch: EpochCallback | None = None,
        initial_epoch: int = 0,
    ) -> TrainHistory:
        model = self._built()
        check_train_data(data, self._config)
        check_initial_epoch(initial_epoch)
        check_plain_training(config, "keras")
        model.optimizer.learning_rate.assign(config.learning_rate)
        reporter = EpochReporter(seed=config.seed, train_images=data.x_train.shape[0], on_epoch=on_epoch)
        with keras.device(self._device):
            model.fit(
                np.asarray(data.x_train, dtype=np.float32),
                np.asarray(data.y_train, dtype=np.int64),
                batch_size=config.batch_size,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                validation_data=(np.asarray(data.x_val, dtype=np.float32), np.asarray(data.y_val, dtype=np.int64)),
                validation_batch_size=INFERENCE_BATCH,
                shuffle=True,
                callbacks=EpochCallbacks([reporter], add_history=True, model=model, epochs=config.epochs),
                verbose=0,
            )
        return TrainHistory(epochs=tuple(reporter.epochs))

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        model = self._built()
        check_images(x, self._config)
        check_labels(y, x.shape[0], self._config.num_classes)
        with keras.device(self._device):
            result = model.evaluate(
                np.asarray(x, dtype=np.float32),
                np.asarray(y, dtype=np.int64),
                batch_size=batch_size,
                verbose=0,
                return_dict=True,
            )
        return Evaluation(loss=float(result["loss"]), accuracy=float(result["accuracy"]))

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        self._built()
        check_images(x, self._config)
        with keras.device(self._device):
            probabilities = self._probabilities.predict(np.asarray(x, dtype=np.float32), batch_size=batch_size, verbose=0)
        return np.asarray(probabilities, dtype=np.float32)

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        model = self._built()
        check_layer_names(self._config, layers)
        check_images(x, self._config)
        wanted = set(layers)
        deepest = max(index for index, layer in enumerate(model.layers) if layer.name in wanted)
        maps: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        with keras.device(self._device), torch.no_grad():
            for start in range(0, x.shape[0], INFERENCE_BATCH):
                activations = keras.ops.convert_to_tensor(np.asarray(x[start : start + INFERENCE_BATCH], dtype=np.float32))
                for layer in model.layers[: deepest + 1]:
                    activations = layer(activations)
                    if layer.name in wanted:
                        channels_last = keras.ops.transpose(activations, (0, 2, 3, 1))
                        maps[layer.name].append(keras.ops.convert_to_numpy(channels_last))
        return {name: np.ascontiguousarray(np.concatenate(parts)) for name, parts in maps.items()}

    def first_conv_kernels(self) -> np.ndarray:
        model = self._built()
        check_has_convolution(self._config)
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
            pip_requirements=pinned("keras", "torch"),
            accepts_input_example=False,
        )

    def _built(self) -> DirectSequential:
        if self._model is None:
            raise RuntimeError(NOT_BUILT)
        return self._model

    def _built_optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer with its slot variables created, which Keras otherwise defers to the first step."""
        optimizer = self._model.optimizer
        if not optimizer.built:
            with keras.device(self._device):
                optimizer.build(self._model.trainable_variables)
        return optimizer
