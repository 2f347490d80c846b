"""What the model costs in floating-point operations, and what this machine can do: the fp32 and bf16 peaks.

FLOPs count multiply-adds as two operations and only the convolutions and dense layers (biases,
ReLUs and pooling are a fraction of a percent). A training step costs about three forward passes:
the forward pass, then the gradients with respect to the activations and to the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cnn_train.plugins.config import ModelConfig

#: The lesson's CNN: 0.45 (conv1) + 7.23 (conv2) + 0.80 (hidden) + 0.003 (logits) MFLOP per image.
REFERENCE_FORWARD_FLOPS = 8.48e6
TRAINING_STEP_FACTOR = 3


def forward_flops(config: ModelConfig) -> int:
    """FLOPs of one image's forward pass through ``config``'s convolutions and dense layers."""
    total = 0
    channels = config.input_shape[2]
    conv_maps = [shape for name, shape in config.feature_map_shapes() if name.startswith("conv")]
    for block, (height, width, filters) in zip(config.conv_layers, conv_maps, strict=True):
        total += 2 * block.kernel_size * block.kernel_size * channels * filters * height * width
        channels = filters
    total += 2 * config.flat_features() * config.dense_units
    total += 2 * config.dense_units * config.num_classes
    return total


def training_flops(config: ModelConfig) -> int:
    """FLOPs of one image's training step (forward and backward)."""
    return TRAINING_STEP_FACTOR * forward_flops(config)


def check_reference_model() -> None:
    """The count must reproduce the lesson's model's known cost, or every share of peak is wrong."""
    counted = forward_flops(ModelConfig())
    if abs(counted / REFERENCE_FORWARD_FLOPS - 1) > 0.005:
        raise AssertionError(
            f"the reference CNN counts {counted / 1e6:.2f} MFLOP forward, expected about "
            f"{REFERENCE_FORWARD_FLOPS / 1e6:.2f}"
        )


@dataclass(frozen=True)
class Peak:
    """The best matmul rate measured in one precision, and how."""

    gflops: float
    size: int
    threads: int
    seconds: tuple[float, ...]
    dtype: str = "float32"


def matmul_peak(size: int = 4096, repeats: int = 3, dtype: str = "float32") -> Peak:
    """GFLOP/s of the fastest of ``repeats`` ``dtype`` (``float32`` or ``bfloat16``) ``size`` x ``size``
    matmuls, after one warm-up, on as many threads as torch uses for training."""
    import torch

    a = torch.randn(size, size).to(getattr(torch, dtype))
    b = torch.randn(size, size).to(getattr(torch, dtype))
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
    return Peak(2 * size**3 / min(seconds) / 1e9, size, torch.get_num_threads(), tuple(seconds), dtype)
