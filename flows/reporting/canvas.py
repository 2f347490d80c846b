"""Where the figures are drawn: a pyplot-free Agg figure, its PNG file, and mosaics of many small
pictures drawn as one image.

A grid of 25-50 pictures drawn as 25-50 axes cost ~2.7 s of a report's savefig time; tiled into
one array and shown with one ``imshow`` on one axes it costs a small fraction of that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure on its own Agg canvas, with constrained layout."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path | str) -> Path:
    """Write ``figure`` as a PNG on a white background, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    """Rows and columns for ``count`` cells, at most ``max_columns`` wide."""
    columns = max(1, min(count, max_columns))
    return math.ceil(count / columns), columns


def as_picture(image: np.ndarray) -> np.ndarray:
    """An image as imshow wants it: (h, w) for one channel, (h, w, 3) for RGB."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        return image[..., 0]
    return image


@dataclass(frozen=True, eq=False)
class Mosaic:
    """Equal-sized tiles laid out on one canvas, with a blank band above each tile for its caption."""

    pixels: np.ndarray
    #: Column and row of each tile's top-left pixel, in tile order.
    origins: tuple[tuple[int, int], ...]
    tile_width: int
    tile_height: int

    def caption_anchor(self, index: int) -> tuple[float, float]:
        """Data coordinates just above the middle of tile ``index``, for text with ``va="bottom"``."""
        x, y = self.origins[index]
        return x + (self.tile_width - 1) / 2, y - 0.6

    def frame(self, index: int, *, color: str, linewidth: float) -> Rectangle:
        """A rectangle along the edge of tile ``index``, not clipped where the tile meets the edge of the axes."""
        x, y = self.origins[index]
        return Rectangle(
            (x - 0.5, y - 0.5),
            self.tile_width,
            self.tile_height,
            fill=False,
            edgecolor=color,
            linewidth=linewidth,
            clip_on=False,
        )


def mosaic(tiles: np.ndarray, columns: int, *, gap: int, band: int = 0) -> Mosaic:
    """Tiles ``(n, h, w)`` or ``(n, h, w, 3)`` in rows of ``columns``, ``gap`` pixels apart, ``band``
    pixels of caption space above each row. The space between tiles is NaN (one channel: shown
    in the colour map's "bad" colour) or white (RGB)."""
    tiles = np.asarray(tiles, dtype=float)
    if tiles.ndim not in (3, 4) or len(tiles) == 0:
        raise ValueError(f"tiles must be a non-empty (n, h, w) or (n, h, w, 3) array, got shape {tiles.shape}")
    count, height, width = tiles.shape[:3]
    rows, columns = grid_shape(count, columns)
    canvas_shape = (rows * (band + height) + (rows - 1) * gap, columns * width + (columns - 1) * gap)
    pixels = np.full(canvas_shape + tiles.shape[3:], np.nan if tiles.ndim == 3 else 1.0)
    origins = []
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        x, y = column * (width + gap), row * (band + height + gap) + band
        pixels[y : y + height, x : x + width] = tile
        origins.append((x, y))
    return Mosaic(pixels, tuple(origins), width, height)


def show_mosaic(ax: Axes, tiles: Mosaic, **imshow_options: object) -> AxesImage:
    """Draw ``tiles`` as one image filling ``ax``, pixels crisp, with no axis decoration."""
    image = ax.imshow(tiles.pixels, interpolation="nearest", **imshow_options)
    ax.set_axis_off()
    return image


def scale_up(tiles: np.ndarray, min_side: int) -> np.ndarray:
    """Tiles ``(n, h, w)`` repeated pixel by pixel until their shorter side is at least ``min_side``,
    so a 3x3 kernel gets room for gaps and captions measured in whole pixels."""
    factor = max(1, math.ceil(min_side / min(tiles.shape[1:3])))
    return tiles.repeat(factor, axis=1).repeat(factor, axis=2)
