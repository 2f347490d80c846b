"""The typed configuration a backend receives: the model's architecture and how to train it.

Validated once, at the edge (flow parameters, CLI options), with messages that name the field
and say what is allowed. Backends read these objects and never re-validate them.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says which field and why."""


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


ArchitectureName = Literal["cnn", "dense"]
ARCHITECTURES: tuple[str, ...] = ("cnn", "dense")


class ModelConfig(BaseModel):
    """The network to build. ``architecture='cnn'`` with defaults is the lesson's model (421,642 parameters);
    ``architecture='dense'`` is the previous lesson's dense network (101,770 parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str = Field(default="cnn", description="'cnn' (the lesson's model) or 'dense'.")
    conv_blocks: tuple[ConvBlock, ...] = Field(
        default=(ConvBlock(filters=32), ConvBlock(filters=64)),
        description="Convolution blocks, in order (ignored by the dense architecture).",
    )
    dense_units: int = Field(default=128, gt=0, description="Units of the hidden dense layer.")
    num_classes: int = Field(default=10, ge=2, description="Number of output classes.")
    input_shape: tuple[int, int, int] = Field(
        default=(28, 28, 1), description="Image shape as (height, width, channels)."
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; allowed: {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("input_shape")
    @classmethod
    def _positive_input(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v <= 0 for v in value):
            raise ValueError(f"input_shape must be positive (height, width, channels), got {value}")
        return value

    @model_validator(mode="after")
    def _feature_maps_do_not_vanish(self) -> ModelConfig:
        self.feature_map_shapes()
        return self

    @property
    def conv_layers(self) -> tuple[ConvBlock, ...]:
        """The convolution blocks this architecture really uses (none for 'dense')."""
        return self.conv_blocks if self.architecture == "cnn" else ()

    def feature_map_shapes(self) -> list[tuple[str, tuple[int, int, int]]]:
        """Names and (height, width, channels) of every conv and pool output, in order.

        Names are ``conv1``, ``pool1``, ``conv2``, ... and are the layer names backends use for
        feature maps. Raises ValueError naming the layer when a map would shrink to nothing.
        """
        height, width, channels = self.input_shape
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
            height, width, channels = pool_h, pool_w, block.filters
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
            total += block.kernel_size * block.kernel_size * channels * block.filters + block.filters
            channels = block.filters
        total += self.flat_features() * self.dense_units + self.dense_units
        total += self.dense_units * self.num_classes + self.num_classes
        return total

    @classmethod
    def preset(cls, architecture: str) -> ModelConfig:
        """The lesson's reference config for ``architecture``."""
        return cls(architecture=architecture)


class TrainConfig(BaseModel):
    """How to train: the lesson uses Adam at 1e-3, batch 32, 10 epochs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=10, ge=1, description="Passes over the training set.")
    batch_size: int = Field(default=32, ge=1, description="Images per optimizer step.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
    seed: int = Field(default=42, ge=0, description="Seed for weights, shuffling and the split.")

    @field_validator("learning_rate")
    @classmethod
    def _finite_learning_rate(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"learning_rate must be a finite number > 0, got {value}")
        return value


def format_validation_error(error: Exception) -> str:
    """One line per invalid field: ``field: what was wrong (got value)``."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or error.title
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)
