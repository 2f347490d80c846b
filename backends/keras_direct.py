"""The Keras backend's fast path: the same model, loss, step and callbacks as Keras's, with less Python per step.

This module is the first to import Keras, so it picks Keras's backend (torch, the framework this
project installs) at import time and refuses to run on a Keras already imported with another one.
Every override here is a documented Keras hook (``call``, ``compute_loss``, ``train_step``,
``CallbackList``) and falls back to Keras's own code for anything it does not match exactly, so
``fit``, Keras callbacks and compiled metrics behave as any Keras user expects.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

KERAS_BACKEND = "torch"

if "keras" not in sys.modules:
    if os.environ.get("KERAS_BACKEND", KERAS_BACKEND) != KERAS_BACKEND:
        logger.debug("overriding KERAS_BACKEND=%s with %s", os.environ["KERAS_BACKEND"], KERAS_BACKEND)
    os.environ["KERAS_BACKEND"] = KERAS_BACKEND

import keras  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim import adam as torch_adam  # noqa: E402  (the module: torch.optim does not expose it as an attribute)

if keras.backend.backend() != KERAS_BACKEND:
    raise RuntimeError(
        f"keras was already imported with the {keras.backend.backend()!r} backend, but the keras backend "
        f"of cnn-train needs {KERAS_BACKEND!r}: set KERAS_BACKEND={KERAS_BACKEND} before anything imports keras"
    )


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
    torch op on the layer's own variables (see :func:`_torch_op`). Those layers need none of the skipped
    machinery: they are built, float32, take no mask and behave the same in training and inference. A
    model with any other layer (Dropout, BatchNormalization: ``training`` matters to them) and symbolic
    calls, which build the graph, take Keras's own ``call``.
    ``fit``, its ``train_step``, the compiled loss and metrics, the optimizer and callbacks are Keras's.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None, **kwargs: Any) -> Any:
        ops = None if keras.backend.is_keras_tensor(inputs) else self._direct_ops()
        if ops is None:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        outputs = inputs
        for op in ops:
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

    def _direct_ops(self) -> tuple[Callable[[Any], Any], ...] | None:
        """Every layer's fused op, or None when any layer has none (the model then runs as Keras runs it)."""
        # Cached in __dict__ (not as a tracked attribute), and rebuilt if the layer list ever changes.
        layers = tuple(self.layers)
        cached = self.__dict__.get("_direct_ops_cache")
        if cached is None or cached[0] != tuple(map(id, layers)):
            ops = tuple(_torch_op(layer) for layer in layers)
            fused = None if None in ops else ops
            cached = self.__dict__["_direct_ops_cache"] = (tuple(map(id, layers)), fused)
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


def _skip_batch(batch: int, logs: dict[str, Any] | None = None) -> None:
    """A batch hook no callback implements."""


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
        for hook in self._BATCH_HOOKS:
            if all(getattr(type(callback), hook) is getattr(keras.callbacks.Callback, hook) for callback in self.callbacks):
                setattr(self, hook, _skip_batch)


@keras.saving.register_keras_serializable(package="cnn_train")
class FusedAdam(keras.optimizers.Adam):
    """Keras's Adam (its variables, settings and update), computed by torch's fused Adam kernel.

    Why: Keras's torch Adam chains seven ``_foreach`` ops with a temporary list each, about 1.9 ms a
    step for this network against 0.3 ms fused: a sixth of a batch-32 training step here. The update is
    Keras's formula: ``m / (sqrt(v) + epsilon)`` scaled by ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``
    equals torch's Adam with its epsilon divided by ``sqrt(1 - beta_2^t)``. AMSGrad, or tensors the
    fused kernel does not take (see :func:`_fusable`), take Keras's own update.
    """

    @torch.no_grad()
    def _backend_update_step(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        # Keras's torch optimizers update every variable in this one private hook, reading the private
        # slot lists as Keras's own torch Adam does; Keras has no public hook for all variables at once
        # (tests/test_keras_step.py guards that it is still called and still matches Keras's Adam).
        params = [variable.value for variable in trainable_variables]
        if self.amsgrad or not _fusable(params, grads):
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        index = self._get_variable_index
        step = float(self.iterations.value) + 1.0  # Keras counts t from 1, as its own update does
        # One count per variable, on its device as the kernel wants it; the kernel adds 1 before using them.
        steps = [torch.full((), step - 1.0, device=param.device) for param in params]
        torch_adam.adam(
            params,
            list(grads),
            [self._momentums[index(variable)].value for variable in trainable_variables],
            [self._velocities[index(variable)].value for variable in trainable_variables],
            [],
            steps,
            fused=True,
            amsgrad=False,
            beta1=float(self.beta_1),
            beta2=float(self.beta_2),
            lr=float(learning_rate),
            weight_decay=0.0,  # Keras applies its weight decay apart, before this hook
            eps=float(self.epsilon) / (1.0 - float(self.beta_2) ** step) ** 0.5,
            maximize=False,
        )


def _fusable(params: list[torch.Tensor], grads: list[Any]) -> bool:
    """True when torch's fused Adam takes these tensors: floating point, each gradient of its variable's
    dtype, all on one device."""
    if not params or len(grads) != len(params):
        return False
    device = params[0].device
    return all(
        isinstance(grad, torch.Tensor) and grad.dtype == param.dtype and grad.device == param.device == device
        and param.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for param, grad in zip(params, grads)
    )
