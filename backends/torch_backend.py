"""The PyTorch backend: the ModelConfig network as an ``nn.Module``, trained by a plain, lean loop.

The whole training set lives on the device as one tensor; each epoch is a seeded ``randperm`` and
slices of it, with no DataLoader. Weights are kept in channels-last memory format, the layout of
the contract's NHWC arrays, so turning an NHWC batch into the NCHW shape PyTorch's API expects is
a free ``permute`` view rather than a copy per batch.

Besides the lessons' networks it builds the opt-in ``cnn-improved`` recipe (batch norm, dropout) and
trains with a one-cycle learning rate, light augmentation, label smoothing and bfloat16 autocast
when the TrainConfig asks. Everything random in an epoch (shuffle, augmentation, dropout) is seeded by the run seed and
the epoch alone, so resuming after epoch k replays epoch k + 1 exactly. Nothing draws from torch's
process-wide generator: the initial weights and every epoch come from generators of the run's own,
so trials training in threads at once (a sweep) get the weights and masks a run of theirs alone gets.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnn_train.backends import _common as common
from cnn_train.plugins.config import AUGMENT_MAX_SHIFT, IMPROVED_ARCHITECTURE, ModelConfig
from cnn_train.plugins.contract import (
    PLAIN_TRAINING, BackendBase, Evaluation, LoggableModel, TrainHistory, Training, check_buildable,
    check_images,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


class Network(nn.Module):
    """The ModelConfig network, taking NCHW images and returning logits.

    ``features`` holds one named stage per feature map (``conv1`` is padding, convolution, batch norm
    when the config asks, and ReLU; ``pool1`` the max pool after it). The last map is flattened in
    (height, width, channels) order, as a channels-last Keras model flattens, so both backends' dense
    weights mean the same thing.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels = config.input_shape[2]
        for index, block in enumerate(config.conv_layers, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            padding = 0
            if block.padding == "same":
                # Keras gives the extra row and column of an even kernel's 'same' padding to the bottom
                # and right; pad explicitly to match (the config allows 'same' only with stride 1).
                before, after = (block.kernel_size - 1) // 2, block.kernel_size // 2
                if before == after:
                    padding = before
                else:
                    layers["pad"] = nn.ZeroPad2d((before, after, before, after))
            layers["conv"] = nn.Conv2d(
                channels,
                block.filters,
                block.kernel_size,
                stride=block.stride,
                padding=padding,
                bias=not config.batch_norm,
            )
            if config.batch_norm:
                layers["norm"] = nn.BatchNorm2d(block.filters)
            layers["relu"] = nn.ReLU()
            stages[f"conv{index}"] = nn.Sequential(layers)
            if block.pool_size:
                stages[f"pool{index}"] = nn.MaxPool2d(block.pool_size, stride=block.pool_stride or block.pool_size)
            channels = block.filters
        self.features = nn.Sequential(stages)
        self.hidden = nn.Linear(config.flat_features(), config.dense_units)
        self.dropout = EpochDropout(config.dropout) if config.dropout else nn.Identity()
        self.logits = nn.Linear(config.dense_units, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images)
        flat = maps.permute(0, 2, 3, 1).flatten(1)
        return self.logits(self.dropout(F.relu(self.hidden(flat))))


class EpochDropout(nn.Module):
    """Dropout that draws its masks from the generator the training loop gives it for the epoch, rather
    than from torch's process-wide one, which another trial's thread may be drawing from."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return inputs
        keep = torch.empty_like(inputs).bernoulli_(1 - self.p, generator=self.generator)
        return inputs * keep / (1 - self.p)


def initialised(config: ModelConfig, seed: int) -> Network:
    """The network with PyTorch's default initialisation drawn from a generator of ``seed`` alone: the
    weights ``torch.manual_seed(seed)`` then ``Network(config)`` give, without touching (or racing
    another thread for) the process-wide generator."""
    with torch.device("meta"):  # shapes only: no draws
        network = Network(config)
    network = network.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():  # construction order, as the layers drew on construction
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # nn.Conv2d's and nn.Linear's reset_parameters(), with the generator.
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())  # 1 / sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    return network


class ProbabilityModel(nn.Module):
    """What gets logged: float32 NHWC images in, class probabilities out."""

    def __init__(self, network: Network) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.network(images.permute(0, 3, 1, 2)), dim=1)


class TorchBackend(BackendBase):
    """Trains the ModelConfig network with PyTorch on the device it is given."""

    mlflow_flavor: ClassVar[str] = "pytorch"
    architectures: ClassVar[tuple[str, ...]] = (*common.ARCHITECTURES, IMPROVED_ARCHITECTURE)
    #: Every recipe option: schedule, augmentation, label smoothing and bfloat16 autocast.
    training_options: ClassVar[tuple[str, ...]] = PLAIN_TRAINING

    def __init__(self) -> None:
        self._config: ModelConfig | None = None
        self._device: torch.device | None = None
        self._network: Network | None = None
        self._optimizer: torch.optim.Adam | None = None

    def build(self, config: ModelConfig, *, device: str, seed: int) -> None:
        check_buildable(config, device, self.architectures)
        common.keep_freed_memory()
        network = initialised(config, seed)
        try:
            network = network.to(device, memory_format=torch.channels_last)
        except (RuntimeError, AssertionError) as error:  # a CPU-only torch asserts on CUDA
            raise common.unusable_device(device, error) from error
        self._device = torch.device(device)
        self._network = network
        self._optimizer = torch.optim.Adam(network.parameters())
        self._config = config
        logger.debug("built %s network on %s", config.architecture, device)

    def parameter_count(self) -> int:
        network, _ = self._built()
        return sum(p.numel() for p in network.parameters() if p.requires_grad)

    def built_config(self) -> ModelConfig:
        if self._config is None:
            raise RuntimeError(common.NOT_BUILT)
        return self._config

    def fit(self, training: Training) -> TrainHistory:
        (network, optimizer), data, config = self._built(), training.data, training.config
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate

        x_train, y_train = self._tensors(data.x_train, data.y_train)
        x_val, y_val = self._tensors(data.x_val, data.y_val)
        norms = [module for module in network.modules() if isinstance(module, nn.BatchNorm2d)]
        count = x_train.shape[0]
        steps_per_epoch = -(-count // config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        bfloat16 = config.precision == "bfloat16"

        def train_epoch(epoch: int) -> tuple[float, float]:
            network.train()
            shuffle = torch.Generator().manual_seed(common.epoch_seed(config.seed, epoch))
            order = torch.randperm(count, generator=shuffle).to(self._device)
            shifts, flips = _augmentation_draws(count, shuffle, self._device) if config.augment else (None, None)
            step = (epoch - 1) * steps_per_epoch
            loss_sum = torch.zeros((), device=self._device)
            correct = torch.zeros((), dtype=torch.int64, device=self._device)
            with _dropout_masks(network, common.epoch_seed(config.seed, epoch), self._device):
                for start in range(0, count, config.batch_size):
                    batch = order[start : start + config.batch_size]
                    labels = y_train[batch]
                    images = x_train[batch]
                    if shifts is not None and flips is not None:
                        end = start + config.batch_size
                        images = _shift_and_flip(images, shifts[start:end], flips[start:end])
                    if config.lr_schedule != "constant":
                        for group in optimizer.param_groups:
                            group["lr"] = config.learning_rate_at(step, total_steps)
                    if step < NORM_WARMUP_STEPS:
                        _average_first_batches(norms, step)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=bfloat16):
                        logits = network(images.permute(0, 3, 1, 2))
                        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    with torch.no_grad():
                        loss_sum += loss * labels.shape[0]
                        correct += (logits.argmax(dim=1) == labels).sum()
            return loss_sum.item() / count, correct.item() / count

        def validate() -> Evaluation:
            # In the training's precision, as Lightning's bf16-mixed and Keras's mixed policies validate: on
            # the recipe's network bfloat16 halves the pass (6,000 images: 0.73 s against 1.40 s on an
            # AVX-512 BF16 EPYC). The test evaluation stays float32, the precision the logged model serves in.
            with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=bfloat16):
                return self._evaluate(x_val, y_val, common.INFERENCE_BATCH)

        return training.run_epochs(train_epoch, validate)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> Evaluation:
        self._built()
        common.check_evaluation(x, y, self._config)
        return self._evaluate(*self._tensors(x, y), batch_size)

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        network, _ = self._built()
        check_images(x, self._config)
        images = self._images(x)
        network.eval()
        with torch.inference_mode():
            batches = [
                F.softmax(network(images[start : start + batch_size].permute(0, 3, 1, 2)), dim=1).cpu()
                for start in range(0, images.shape[0], batch_size)
            ]
        return torch.cat(batches).numpy().astype(np.float32, copy=False)

    def feature_maps(self, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        network, _ = self._built()
        common.check_feature_request(self._config, x, layers)
        wanted = set(layers)
        maps: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        images = self._images(x)
        network.eval()
        with torch.inference_mode():
            for start in range(0, images.shape[0], common.INFERENCE_BATCH):
                activations = images[start : start + common.INFERENCE_BATCH].permute(0, 3, 1, 2)
                for name, stage in network.features.named_children():
                    activations = stage(activations)
                    if name in wanted:
                        maps[name].append(activations.permute(0, 2, 3, 1).cpu().numpy())
        return {name: np.ascontiguousarray(np.concatenate(parts)) for name, parts in maps.items()}

    def first_conv_kernels(self) -> np.ndarray:
        network, _ = self._built()
        common.check_has_convolution(self._config)
        conv = network.features.conv1.conv
        # PyTorch stores (filters, in, kh, kw); the contract speaks Keras' (kh, kw, in, filters).
        return np.ascontiguousarray(conv.weight.detach().permute(2, 3, 1, 0).cpu().numpy())

    def save(self, path: Path) -> None:
        network, optimizer = self._built()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict()}, path / CHECKPOINT_FILE)

    def load(self, path: Path, config: ModelConfig, *, device: str) -> None:
        checkpoint_file = Path(path) / CHECKPOINT_FILE
        if not checkpoint_file.is_file():
            raise FileNotFoundError(f"no torch checkpoint at {checkpoint_file}; was it written by TorchBackend.save?")
        self.build(config, device=device, seed=0)
        checkpoint = torch.load(checkpoint_file, map_location=self._device, weights_only=True)
        self._network.load_state_dict(checkpoint["model"])
        self._optimizer.load_state_dict(checkpoint["optimizer"])

    def loggable_model(self) -> LoggableModel:
        network, _ = self._built()
        # A copy, so logging neither moves the live model off its device nor out of training mode.
        logged = ProbabilityModel(copy.deepcopy(network).to("cpu", memory_format=torch.contiguous_format))
        return LoggableModel(flavor=self.mlflow_flavor, model=logged.eval(), pip_requirements=common.pinned("torch"))

    def _built(self) -> tuple[Network, torch.optim.Adam]:
        if self._network is None or self._optimizer is None:
            raise RuntimeError(common.NOT_BUILT)
        return self._network, self._optimizer

    def _images(self, x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=self._device)

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._images(x), torch.tensor(y, dtype=torch.int64, device=self._device)

    def _evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Evaluation:
        network = self._network
        network.eval()
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                batch_labels = labels[start : start + batch_size]
                logits = network(images[start : start + batch_size].permute(0, 3, 1, 2))
                loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum")
                correct += (logits.argmax(dim=1) == batch_labels).sum()
        count = images.shape[0]
        return Evaluation(loss=loss_sum.item() / count, accuracy=correct.item() / count)


#: Batch norm's running statistics average its first batches equally (momentum 1/(n+1)), then follow
#: PyTorch's default momentum: with 0.1 from the first step, 15 steps (one epoch of 2,000 images at the
#: recipe's batch 128) left a fifth of the initial mean 0 and variance 1 in them, and the network scored
#: chance (10%) in evaluation; a long run ends on the same statistics either way (0.9 ** 400 ~ 5e-19).
NORM_MOMENTUM = 0.1
NORM_WARMUP_STEPS = round(1 / NORM_MOMENTUM)


def _average_first_batches(norms: Sequence[nn.BatchNorm2d], step: int) -> None:
    for norm in norms:
        norm.momentum = max(NORM_MOMENTUM, 1 / (step + 1))


@contextlib.contextmanager
def _dropout_masks(network: nn.Module, seed: int, device: torch.device) -> Iterator[None]:
    """The epoch's dropout masks drawn from ``seed``; no generator stays on the network after it (one
    would follow the network into the copy that gets logged)."""
    layers = [module for module in network.modules() if isinstance(module, EpochDropout)]
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in layers:
        layer.generator = generator
    try:
        yield
    finally:
        for layer in layers:
            layer.generator = None


def _augmentation_draws(
    count: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of an epoch: a (row, column) shift in ``[-AUGMENT_MAX_SHIFT, AUGMENT_MAX_SHIFT]`` and whether to
    mirror it. Drawn on the CPU from the epoch's generator, so every device sees the same epoch."""
    shifts = torch.randint(-AUGMENT_MAX_SHIFT, AUGMENT_MAX_SHIFT + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return shifts.to(device), flips.to(device)


def _shift_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """NHWC ``images`` shifted (zero fill) and mirrored per image, as one gather from a zero-padded copy."""
    n, height, width, _ = images.shape
    margin = AUGMENT_MAX_SHIFT
    padded = F.pad(images, (0, 0, margin, margin, margin, margin))
    rows = torch.arange(height, device=images.device) + margin - shifts[:, :1]
    columns = torch.arange(width, device=images.device) + margin - shifts[:, 1:]
    columns = torch.where(flips[:, None], columns.flip(1), columns)
    return padded[torch.arange(n, device=images.device)[:, None, None], rows[:, :, None], columns[:, None, :]]
