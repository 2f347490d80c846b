"""Grids of small pictures: test predictions, the most confident mistakes, the first convolution's
kernels and a test image's feature maps.

Each grid is tiled into one array and drawn with one ``imshow`` (see :mod:`.canvas`); captions
are text placed above their tiles, and frames are rectangles around them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from cnn_train.flows.reporting.canvas import as_picture, mosaic, new_figure, save, scale_up, show_mosaic

MISTAKE_COLOR = "#c62828"
#: Room for a two-line caption at 9 points, in inches.
_TWO_LINE_BAND = 0.38


def _with_white_gaps(name: str) -> Colormap:
    """Colour map ``name`` painting the NaN gaps between tiles white."""
    return colormaps[name].with_extremes(bad="white")


@dataclass(frozen=True)
class Predictions:
    """Test images with their true labels and predicted class probabilities, checked to line up with
    each other and the class names; what the prediction grids draw."""

    images: np.ndarray
    y_true: np.ndarray
    probabilities: np.ndarray
    class_names: Sequence[str]

    def __post_init__(self) -> None:
        images, y_true, probabilities = np.asarray(self.images), np.asarray(self.y_true), np.asarray(self.probabilities)
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be (n, height, width[, channels]), got shape {images.shape}")
        if not len(images) == len(y_true) == len(probabilities):
            raise ValueError(
                "images, y_true and probabilities must have the same length, "
                f"got {len(images)}, {len(y_true)} and {len(probabilities)}"
            )
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.class_names):
            raise ValueError(
                f"probabilities must be (n, {len(self.class_names)}) to match the class names, "
                f"got shape {probabilities.shape}"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "y_true", y_true)
        object.__setattr__(self, "probabilities", probabilities)

    @cached_property
    def predicted(self) -> np.ndarray:
        """The most probable class of each image."""
        return self.probabilities.argmax(axis=1)


def prediction_title(predicted: str, confidence: float, true: str, true_probability: float | None = None) -> str:
    """``"Sneaker (97%)\\ntrue: Sandal"``; with ``true_probability`` the true class gets its percentage too."""
    truth = f"true: {true}" if true_probability is None else f"true: {true} ({true_probability:.0%})"
    return f"{predicted} ({confidence:.0%})\n{truth}"


def _prediction_figure(
    indices: np.ndarray, predictions: Predictions, *, columns: int, tile_inches: float, show_true_probability: bool
) -> Figure:
    """The pictures at ``indices``, each captioned with prediction and truth, mistakes framed in red."""
    pictures = np.stack([as_picture(predictions.images[index]) for index in indices])
    inches_per_pixel = tile_inches / pictures.shape[1]
    tiles = mosaic(
        pictures,
        columns,
        gap=math.ceil(0.15 / inches_per_pixel),
        band=math.ceil(_TWO_LINE_BAND / inches_per_pixel),
    )
    height, width = tiles.pixels.shape[:2]
    figure = new_figure(max(width * inches_per_pixel + 0.3, 6), height * inches_per_pixel + 0.7)
    ax = figure.add_subplot()
    show_mosaic(ax, tiles, cmap=_with_white_gaps("binary"), vmin=0, vmax=1)
    predicted, probabilities, class_names = predictions.predicted, predictions.probabilities, predictions.class_names
    for tile, index in enumerate(indices):
        pred, true = int(predicted[index]), int(predictions.y_true[index])
        wrong = pred != true
        caption = prediction_title(
            class_names[pred],
            float(probabilities[index, pred]),
            class_names[true],
            float(probabilities[index, true]) if show_true_probability else None,
        )
        ax.text(
            *tiles.caption_anchor(tile),
            caption,
            ha="center",
            va="bottom",
            fontsize=9,
            color=MISTAKE_COLOR if wrong else "black",
        )
        ax.add_patch(tiles.frame(tile, color=MISTAKE_COLOR if wrong else "black", linewidth=2.5 if wrong else 0.8))
    return figure


def plot_predictions_grid(predictions: Predictions, path: Path | str, *, n: int = 25) -> Path:
    """The first ``n`` images titled with prediction, confidence and truth; mistakes framed in red."""
    indices = np.arange(min(n, len(predictions.images)))
    if indices.size == 0:
        raise ValueError("no images to plot: pass at least one image and n >= 1")
    figure = _prediction_figure(indices, predictions, columns=5, tile_inches=1.7, show_true_probability=False)
    correct = int((predictions.predicted[indices] == predictions.y_true[indices]).sum())
    figure.suptitle(f"Predictions: {correct} of {len(indices)} right (mistakes in red)")
    return save(figure, path)


def confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` misclassified samples with the highest predicted-class probability, surest first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def plot_confident_mistakes(predictions: Predictions, path: Path | str, *, n: int = 16) -> Path:
    """The ``n`` mistakes the model was surest of, or a figure saying there were none."""
    indices = confident_mistakes(predictions.y_true, predictions.probabilities, n)
    if indices.size == 0:
        figure = new_figure(6, 3.5)
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, f"No mistakes among {len(predictions.images):,} images", ha="center", va="center", fontsize=16)
        ax.set_axis_off()
        figure.suptitle("Most confident mistakes")
        return save(figure, path)
    figure = _prediction_figure(indices, predictions, columns=4, tile_inches=1.9, show_true_probability=True)
    total = int((predictions.predicted != predictions.y_true).sum())
    figure.suptitle(f"Most confident mistakes ({len(indices)} of {total:,})")
    return save(figure, path)


def plot_kernels(kernels: np.ndarray, path: Path | str, *, title: str = "First convolution kernels") -> Path:
    """Every filter of a ``(kernel_h, kernel_w, in_channels, filters)`` kernel on one zero-centred colour scale."""
    kernels = np.asarray(kernels, dtype=float)
    if kernels.ndim != 4:
        raise ValueError(f"kernels must be (kernel_h, kernel_w, in_channels, filters), got shape {kernels.shape}")
    in_channels, filters = kernels.shape[2], kernels.shape[3]
    # Averaging over input channels keeps one square per filter for RGB or deeper inputs.
    shown = np.moveaxis(kernels.mean(axis=2), -1, 0)
    if in_channels > 1:
        title = f"{title} (mean over {in_channels} input channels)"
    # A 3x3 kernel is blown up to whole pixels big enough for the gaps and captions between them.
    tiles_pixels = scale_up(shown, 24)
    inches_per_pixel = 1.0 / tiles_pixels.shape[1]
    tiles = mosaic(
        tiles_pixels, 8, gap=math.ceil(0.25 / inches_per_pixel), band=math.ceil(0.22 / inches_per_pixel)
    )
    height, width = tiles.pixels.shape[:2]
    figure = new_figure(max(width * inches_per_pixel + 1.6, 6), max(height * inches_per_pixel + 0.8, 3))
    ax = figure.add_subplot()
    limit = float(np.abs(shown).max()) or 1.0
    image = show_mosaic(ax, tiles, cmap=_with_white_gaps("RdBu_r"), vmin=-limit, vmax=limit)
    for index in range(filters):
        ax.text(*tiles.caption_anchor(index), f"#{index + 1}", ha="center", va="bottom", fontsize=8)
        # A frame per kernel, since weights near zero are as white as the gaps around them.
        ax.add_patch(tiles.frame(index, color="black", linewidth=0.8))
    figure.colorbar(image, ax=ax, shrink=0.8, label="weight")
    figure.suptitle(f"{title}: {filters} filters of {kernels.shape[0]}x{kernels.shape[1]}")
    return save(figure, path)


def _single_map_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"feature map {name!r} must be (height, width, channels) or (1, h, w, c), got {shape}")
    return shape


def feature_map_title(name: str, shape: Sequence[int]) -> str:
    """``"conv1 28x28x32"`` for a map of shape (28, 28, 32) or (1, 28, 28, 32)."""
    return f"{name} {'x'.join(str(side) for side in _single_map_shape(name, shape))}"


def _each_on_its_own_scale(channels: np.ndarray) -> np.ndarray:
    """Channels ``(n, h, w)`` each stretched to [0, 1], as separate imshow calls would autoscale them."""
    low = channels.min(axis=(1, 2), keepdims=True)
    span = channels.max(axis=(1, 2), keepdims=True) - low
    return np.divide(channels - low, span, out=np.zeros_like(channels), where=span > 0)


def plot_feature_maps(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: Path | str,
    *,
    max_channels: int = 16,
) -> Path:
    """The input image beside, for each layer in the given order, a grid of its first ``max_channels`` channels."""
    if not maps:
        raise ValueError("maps is empty: pass at least one layer's activations (e.g. conv1)")
    layers = {
        name: np.asarray(values, dtype=float).reshape(_single_map_shape(name, np.shape(values)))
        for name, values in maps.items()
    }
    columns = min(8, max_channels)
    grid_rows = {name: math.ceil(min(max_channels, values.shape[2]) / columns) for name, values in layers.items()}
    heights = [1.25 * rows + 0.5 for rows in grid_rows.values()]
    figure = new_figure(3.2 + 1.25 * columns, sum(heights))
    input_figure, layers_figure = figure.subfigures(1, 2, width_ratios=[3.2, 1.25 * columns])
    input_ax = input_figure.subplots()
    input_ax.imshow(as_picture(image), cmap="binary")
    input_ax.set_title(f"input {'x'.join(str(side) for side in np.shape(image))}")
    input_ax.set_xticks([])
    input_ax.set_yticks([])
    layer_axes = np.atleast_1d(layers_figure.subplots(len(layers), 1, height_ratios=heights))
    for ax, (name, values) in zip(layer_axes, layers.items(), strict=True):
        channels = values.shape[2]
        shown = min(max_channels, channels)
        # Every layer blown up to the input's size, so a 7x7 map's gaps match a 28x28 map's.
        tiles = mosaic(
            scale_up(_each_on_its_own_scale(np.moveaxis(values[:, :, :shown], -1, 0)), np.shape(image)[0]),
            columns,
            gap=max(1, round(np.shape(image)[0] / 14)),
        )
        show_mosaic(ax, tiles, cmap=_with_white_gaps("viridis"), vmin=0, vmax=1)
        ax.set_anchor("W")
        note = f" (first {shown} of {channels} channels)" if shown < channels else ""
        ax.set_title(feature_map_title(name, values.shape) + note, fontsize=11, loc="left")
    figure.suptitle("Feature maps", fontsize=13)
    return save(figure, path)
