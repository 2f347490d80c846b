"""The typed configuration a backend receives: the model's architecture and how to train it.

Validated once, at the edge (flow parameters, CLI options), with messages that name the field
and say what is allowed. Backends read these objects and never re-validate them.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

#: The lesson's class names, in label order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class ConvBlock(BaseModel):
    """One convolution (with ReLU) optionally followed by a max pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filters: int = Field(gt=0, description="Number of output channels of the convolution.")
    kernel_size: int = Field(default=3, gt=0, description="Square kernel side.")
    padding: Literal["same", "valid"] = Field(default="same", description="Convolution padding.")
    stride: int = Field(default=1, gt=0, description="Convolution stride.")
    pool_size: int = Field(default=2, ge=0, description="Max-pool window side; 0 means no pool.")
    pool_stride: int | None = Field(
        default=None, gt=0, description="Max-pool stride; defaults to the pool size."
    )

    @model_validator(mode="after")
    def _same_padding_needs_stride_one(self) -> ConvBlock:
        # Keras and PyTorch disagree on how to pad 'same' convolutions with stride > 1,
        # so both backends could not interpret such a block identically.
        if self.padding == "same" and self.stride != 1:
            raise ValueError(
                f"padding='same' needs stride=1 (got stride={self.stride}); "
                "use padding='valid' for strided convolutions"
            )
        return self


def conv_output_side(side: int, block: ConvBlock) -> tuple[int, int]:
    """Spatial side after the convolution and after the pool of ``block`` (floor division, as both frameworks)."""
    if block.padding == "same":
        after_conv = side
    else:
        after_conv = (side - block.kernel_size) // block.stride + 1
    if block.pool_size == 0:
        return after_conv, after_conv
    pool_stride = block.pool_stride or block.pool_size
    after_pool = (after_conv - block.pool_size) // pool_stride + 1
    return after_conv, after_pool


def _a_share(value: float, info: ValidationInfo) -> float:
    """A field that is a share of something: 0 (off) up to, but not including, 1 (all of it)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{info.field_name} must be a share in [0, 1), got {value}")
    return value


#: The networks a run can build: the lesson's CNN, the previous lesson's dense network, the improved recipe.
Architecture = Literal["cnn", "dense", "cnn-improved"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
#: The opt-in improved recipe: a CNN that may use batch norm and dropout. The lessons' 'cnn' and 'dense'
#: networks stay plain so that every backend builds them; only backends listing this name build the recipe.
IMPROVED_ARCHITECTURE = "cnn-improved"


class ModelConfig(BaseModel):
    """The network to build. ``architecture='cnn'`` with defaults is the lesson's model (421,642 parameters);
    ``architecture='dense'`` is the previous lesson's dense network (101,770 parameters);
    ``ModelConfig.preset('cnn-improved')`` is the opt-in improved recipe (batch norm and dropout)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Architecture = Field(
        default="cnn",
        description="'cnn' (the lesson's model), 'dense' (the previous lesson's) or 'cnn-improved' (the opt-in recipe).",
    )
    conv_blocks: tuple[ConvBlock, ...] = Field(
        default=(ConvBlock(filters=32), ConvBlock(filters=64)),
        description="Convolution blocks, in order (ignored by the dense architecture).",
    )
    dense_units: int = Field(default=128, gt=0, description="Units of the hidden dense layer.")
    num_classes: int = Field(default=10, ge=2, description="Number of output classes.")
    input_shape: tuple[int, int, int] = Field(
        default=(28, 28, 1), description="Image shape as (height, width, channels)."
    )
    batch_norm: bool = Field(
        default=False,
        description="Batch normalisation after each convolution, before its ReLU ('cnn-improved' only); "
        "the convolutions then have no bias, which the normalisation's shift replaces.",
    )
    dropout: float = Field(
        default=0.0, description="Share of hidden dense units dropped while training ('cnn-improved' only)."
    )

    @field_validator("input_shape")
    @classmethod
    def _positive_input(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v <= 0 for v in value):
            raise ValueError(f"input_shape must be positive (height, width, channels), got {value}")
        return value

    _dropout_is_a_share = field_validator("dropout")(_a_share)

    @model_validator(mode="after")
    def _recipe_layers_need_the_recipe(self) -> ModelConfig:
        # A backend that builds only the lessons' plain networks would silently leave these layers out.
        used = [name for name, on in (("batch_norm", self.batch_norm), ("dropout", self.dropout > 0)) if on]
        if used and self.architecture != IMPROVED_ARCHITECTURE:
            verb = "needs" if len(used) == 1 else "need"
            raise ValueError(
                f"{' and '.join(used)} {verb} architecture={IMPROVED_ARCHITECTURE!r}; "
                f"{self.architecture!r} is the lesson's plain network"
            )
        return self

    @model_validator(mode="after")
    def _feature_maps_do_not_vanish(self) -> ModelConfig:
        self.feature_map_shapes()
        return self

    @property
    def conv_layers(self) -> tuple[ConvBlock, ...]:
        """The convolution blocks this architecture really uses (none for 'dense')."""
        return self.conv_blocks if self.architecture != "dense" else ()

    def feature_map_shapes(self) -> list[tuple[str, tuple[int, int, int]]]:
        """Names and (height, width, channels) of every conv and pool output, in order.

        Names are ``conv1``, ``pool1``, ``conv2``, ... and are the layer names backends use for
        feature maps. Raises ValueError naming the layer when a map would shrink to nothing.
        """
        height, width, _ = self.input_shape
        shapes: list[tuple[str, tuple[int, int, int]]] = []
        for index, block in enumerate(self.conv_layers, start=1):
            conv_h, pool_h = conv_output_side(height, block)
            conv_w, pool_w = conv_output_side(width, block)
            if conv_h < 1 or conv_w < 1:
                raise ValueError(
                    f"conv{index} (kernel {block.kernel_size}, stride {block.stride}, padding "
                    f"{block.padding!r}) would turn a {height}x{width} input into {conv_h}x{conv_w}; "
                    "use fewer blocks, padding='same' or a smaller kernel"
                )
            shapes.append((f"conv{index}", (conv_h, conv_w, block.filters)))
            if block.pool_size:
                if pool_h < 1 or pool_w < 1:
                    raise ValueError(
                        f"pool{index} (size {block.pool_size}) would turn a {conv_h}x{conv_w} map into "
                        f"{pool_h}x{pool_w}; use fewer pooling blocks or pool_size=0 on some of them"
                    )
                shapes.append((f"pool{index}", (pool_h, pool_w, block.filters)))
            height, width = pool_h, pool_w
        return shapes

    def flat_features(self) -> int:
        """Length of the vector entering the hidden dense layer."""
        shapes = self.feature_map_shapes()
        h, w, c = shapes[-1][1] if shapes else self.input_shape
        return h * w * c

    def parameter_count(self) -> int:
        """Trainable parameters every backend must reproduce for this config."""
        total = 0
        channels = self.input_shape[2]
        for block in self.conv_layers:
            total += block.kernel_size * block.kernel_size * channels * block.filters
            # A convolution's bias, or with batch norm (which makes that bias redundant) its scale and shift.
            total += 2 * block.filters if self.batch_norm else block.filters
            channels = block.filters
        total += self.flat_features() * self.dense_units + self.dense_units
        total += self.dense_units * self.num_classes + self.num_classes
        return total

    @classmethod
    def preset(cls, architecture: str) -> ModelConfig:
        """The lesson's reference config for ``architecture``, or the improved recipe's network."""
        if architecture == IMPROVED_ARCHITECTURE:
            return cls(architecture=architecture, **IMPROVED_MODEL)
        return cls(architecture=architecture)


LearningRateSchedule = Literal["constant", "onecycle"]
Precision = Literal["float32", "bfloat16", "auto"]

#: One-cycle shape (PyTorch's ``OneCycleLR`` defaults): warm up from ``peak / 25`` over the first 30% of the
#: steps, then anneal to ``peak / 25 / 1e4``, both along a cosine.
ONECYCLE_WARMUP_SHARE = 0.3
ONECYCLE_START_DIVISOR = 25.0
ONECYCLE_END_DIVISOR = 25.0 * 1e4

#: Largest shift, in pixels along each axis, of the light augmentation.
AUGMENT_MAX_SHIFT = 2


class TrainConfig(BaseModel):
    """How to train: the lesson uses Adam at 1e-3, batch 32, 10 epochs, with a constant learning rate,
    no augmentation, no label smoothing and float32 arithmetic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=10, ge=1, le=1000, description="Passes over the training set.")
    batch_size: int = Field(default=32, ge=1, description="Images per optimizer step.")
    learning_rate: float = Field(
        default=1e-3, gt=0, allow_inf_nan=False, description="Adam learning rate (with the one-cycle schedule, its peak)."
    )
    seed: int = Field(default=42, ge=0, lt=2**32, description="Seed for weights, shuffling and the split.")
    lr_schedule: LearningRateSchedule = Field(
        default="constant",
        description="'constant', or 'onecycle': warm up to learning_rate then anneal, over all the epochs.",
    )
    augment: bool = Field(
        default=False,
        description=f"Light augmentation of training images: a random horizontal flip and a random shift "
        f"of up to {AUGMENT_MAX_SHIFT} pixels along each axis (zero fill), drawn per image and epoch.",
    )
    label_smoothing: float = Field(
        default=0.0, description="Share of each target's probability spread evenly over all the classes."
    )
    precision: Precision = Field(
        default="float32",
        description="'bfloat16' runs training's convolutions and matrix products, and each epoch's validation pass, "
        "in bfloat16 (weights, optimizer state and the test evaluation stay float32): about twice as fast on CPUs "
        "with AMX or AVX-512 BF16, far slower on others; 'auto' lets the flow pick bfloat16 only where the training "
        "device computes it natively.",
    )

    @field_validator("learning_rate")
    @classmethod
    def _finite_learning_rate(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"learning_rate must be a finite number > 0, got {value}")
        return value

    _smoothing_is_a_share = field_validator("label_smoothing")(_a_share)

    def learning_rate_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (from 0) of ``total_steps``.

        A function of the step alone, so a run resumed after epoch k continues the schedule exactly
        where an unbroken run would be.
        """
        if self.lr_schedule == "constant":
            return self.learning_rate
        warmup = ONECYCLE_WARMUP_SHARE * total_steps - 1
        start, end = self.learning_rate / ONECYCLE_START_DIVISOR, self.learning_rate / ONECYCLE_END_DIVISOR
        if step <= warmup:
            return _cosine(start, self.learning_rate, step / warmup if warmup > 0 else 1.0)
        return _cosine(self.learning_rate, end, (step - warmup) / (total_steps - 1 - warmup))


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


#: The improved recipe's network: two convolutions before each of the lesson's two pools (32, 32, pool,
#: 64, 64, pool), batch norm, and dropout before the output layer (468,010 parameters). Chosen by measurement
#: (benchmarks/bench_recipe.py, full data, seed 42): it reaches 93.75% test accuracy in 7 epochs, against
#: 92.82% for the lesson's network with the same recipe in 10 and 93.13% for a third 128-filter block in 10.
IMPROVED_MODEL: dict[str, Any] = {
    "conv_blocks": (
        ConvBlock(filters=32, pool_size=0),
        ConvBlock(filters=32),
        ConvBlock(filters=64, pool_size=0),
        ConvBlock(filters=64),
    ),
    "batch_norm": True,
    "dropout": 0.3,
}

#: The improved recipe's training, used where a run leaves the lesson's training defaults. bfloat16 and
#: batch 128 make an epoch of the recipe's network cost about 1.4 of the lesson's (batch 32, float32) on
#: this project's 2-core AMX CPU, so 7 epochs fit in the default run's 10. On a CPU without AMX or
#: AVX-512 BF16, bfloat16 is emulated: one epoch took 944 s instead of about 75 on an AVX2 EPYC, so
#: the precision is "auto" (see flows/placement.training_precision). Light augmentation did not pay
#: over so few epochs (91.94% against 92.82% without), so it stays off.
IMPROVED_TRAINING: dict[str, Any] = {
    "epochs": 7,
    "batch_size": 128,
    "learning_rate": 3e-3,
    "lr_schedule": "onecycle",
    "label_smoothing": 0.1,
    "precision": "auto",
}


def recipe_training_defaults(architecture: str) -> dict[str, Any]:
    """TrainConfig values that ``architecture``'s recipe uses in place of the lesson's defaults."""
    return dict(IMPROVED_TRAINING) if architecture == IMPROVED_ARCHITECTURE else {}


def format_validation_error(error: Exception) -> str:
    """Every invalid field on one line: ``field: what was wrong (got value); ...``."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if isinstance(item.get("input"), str) and not item["input"].strip() and item["type"].startswith("string_"):
            message = "must hold a character other than spaces"  # pydantic's says "at least 1 character" of '  '
        if item["loc"]:
            got = repr(item.get("input"))  # unless the message quotes it already ("invalid device request 'tpu'")
            shown = isinstance(item.get("input"), str) and got in message
            lines.append(f"{'.'.join(map(str, item['loc']))}: {message}" + ("" if shown else f" (got {got})"))
        else:  # a check of the whole model: its message names the fields; its input is every value
            lines.append(message)
    return "; ".join(lines)
