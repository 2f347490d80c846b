"""A picture of a few classified images: what the model saw, captioned with its answer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnn_train.flows.predict.images import ModelInput
from cnn_train.flows.reporting.canvas import mosaic, new_figure, save, show_mosaic

#: Images in the figure: enough to see what the batch looks like, few enough to read the captions.
EXAMPLES = 12
_TILE_INCHES = 1.6
_CAPTION_INCHES = 0.4


def plot_examples(
    inputs: Sequence[ModelInput], predicted: Sequence[str], probabilities: Sequence[float], path: Path
) -> Path:
    """The first :data:`EXAMPLES` inputs as the model saw them, each titled ``class (p%)`` and its file name."""
    count = min(EXAMPLES, len(inputs))
    if count == 0:
        raise ValueError("no classified images to draw")
    tiles = np.stack([item.pixels[..., 0] for item in inputs[:count]])
    inches_per_pixel = _TILE_INCHES / tiles.shape[1]
    grid = mosaic(tiles, 6, gap=math.ceil(0.15 / inches_per_pixel), band=math.ceil(_CAPTION_INCHES / inches_per_pixel))
    height, width = grid.pixels.shape
    figure = new_figure(max(width * inches_per_pixel + 0.3, 4), height * inches_per_pixel + 0.6)
    ax = figure.add_subplot()
    show_mosaic(ax, grid, cmap="gray", vmin=0, vmax=1)
    for tile in range(count):
        name = inputs[tile].path.name
        caption = f"{predicted[tile]} ({probabilities[tile]:.0%})\n{name if len(name) <= 18 else name[:15] + '...'}"
        ax.text(*grid.caption_anchor(tile), caption, ha="center", va="bottom", fontsize=8)
    figure.suptitle(f"What the model saw: {count} of {len(inputs)} images, with its answer")
    return save(figure, path)
