"""Image files as the model's input: any size, colour or grayscale, dark or light background, brought
to a 28x28 picture the way Fashion-MNIST's were made.

Zalando made Fashion-MNIST from product photos by trimming the edges close to the background colour,
resizing the longest edge to 28 pixels, centring the result on a 28x28 canvas, negating the
intensities and converting to 8-bit grayscale: a light garment on black, its brightest pixel at or
near 255 (every test image's maximum is 254 or 255). :func:`to_model_input` does the same steps to
any picture, deciding from its border whether the background is light (then it negates it).
"""

from __future__ import annotations

import os

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnn_train.flows.errors import ExpectedFailure

SIDE = 28
#: Pixels closer than this share of the full range to the background count as background when
#: trimming (Fashion-MNIST's own rule: within 5% of the maximum intensity). It also absorbs JPEG noise.
TRIM_SHARE = 0.05
#: A border brighter than the middle of the range is a light background, which Fashion-MNIST's is not.
LIGHT_BACKGROUND = 127.5
#: Pictures are read at no more than about this many pixels a side (at least this many, at most twice).
WORKING_SIDE = 1024
#: Modes whose pixels can be averaged (not palette indices, not 1-bit).
_AVERAGED_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "LAB"})


class ImageReadError(ExpectedFailure, ValueError):
    """A file that is not a readable image, or one with nothing to classify; the message names the file and why."""


@dataclass(frozen=True, eq=False)
class ModelInput:
    """One image file and the 28x28 picture the model gets from it, float32 ``(28, 28, 1)`` in [0, 1]."""

    path: Path
    pixels: np.ndarray
    inverted: bool


@dataclass(frozen=True)
class Collected:
    """Image files found under the given paths, and what was passed over or is missing."""

    files: tuple[Path, ...]
    skipped: tuple[Path, ...]
    missing: tuple[Path, ...]


def image_suffixes() -> frozenset[str]:
    """File name endings Pillow can open (``.png``, ``.jpg``, ``.jpeg``, ``.webp``...)."""
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


def collect_images(paths: Iterable[Path | str]) -> Collected:
    """Files given by name are taken whatever their ending (a bad one is then reported by name); a
    folder contributes its image files, searched recursively and sorted, passing over other files."""
    suffixes = image_suffixes()
    files: list[Path] = []
    skipped: list[Path] = []
    missing: list[Path] = []
    for path in map(Path, paths):
        try:
            folder, file = path.is_dir(), path.is_file()
        except PermissionError:  # in a folder this user cannot enter
            folder = file = False
        if folder and os.access(path, os.R_OK | os.X_OK):  # rglob passes over a folder it cannot list, silently
            for found in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                (files if found.suffix.lower() in suffixes else skipped).append(found)
        elif file:
            files.append(path)
        else:
            missing.append(path)
    return Collected(tuple(files), tuple(skipped), tuple(missing))


#: Why :func:`not_taken` passed over a path with nothing at it (the predict flow then says where it looked).
NOTHING_THERE = "no such file or folder"


def not_taken(path: Path) -> str:
    """Why :func:`collect_images` did not take a path given by name."""
    try:
        if path.is_dir():
            return "a folder this user cannot read (permission denied)"
        return "not a regular file or folder (a pipe, socket or device)" if path.exists() else NOTHING_THERE
    except PermissionError:
        return "in a folder this user cannot enter (permission denied)"


def read_grayscale(path: Path) -> np.ndarray:
    """The file's pixels as float ``(h, w)`` in [0, 255]; transparency is laid over white, so a
    cut-out garment counts as on a light background; 16-bit, 32-bit and float greys are scaled, not clipped."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between its pixel limit and twice it, and refuses above (caught below); what
            # is decoded is brought down to a working size at once.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.draft(None, (WORKING_SIDE, WORKING_SIDE))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale
                opened.load()
                image = _reduced(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: not a readable image ({_reason(error)})") from None
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's convert("L") clips these at 255 instead of scaling them: a 16-bit PNG came out white.
        pixels = np.asarray(image, dtype=np.float64)
        finite = pixels[np.isfinite(pixels)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        # One infinite pixel made every other one black; below zero, the image states its own range.
        pixels = np.nan_to_num(pixels, nan=low, posinf=high, neginf=low) - min(low, 0.0)
        return np.clip(pixels * (255.0 / _white_level(image.mode, pixels)), 0.0, 255.0)
    if image.mode == "LAB":  # Pillow converts LAB to nothing; its L channel is the lightness
        return np.asarray(image.getchannel("L"), dtype=np.float64)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float64)


def _reduced(image: Image.Image) -> Image.Image:
    """``image`` averaged down by a whole factor to about ``WORKING_SIDE`` pixels a side: a 28x28 result
    needs no more, and a phone photo is then read in a fifth of the time. Palette and 16-bit images,
    which Pillow cannot average this way, stay whole."""
    factor = max(image.size) // WORKING_SIDE
    if factor < 2 or image.mode not in _AVERAGED_MODES:
        return image
    return image.reduce(factor)


def _white_level(mode: str, pixels: np.ndarray) -> float:
    """The value of white in a grey image of more than 8 bits: 65535 in a 16-bit one. 32-bit integers
    and floats state no range, so the smallest usual one that holds the brightest pixel: 1 (floats
    only), 255 or 65535."""
    if mode.startswith("I;16"):
        return 65535.0
    brightest = float(pixels.max(initial=0.0))
    levels = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
    return next((level for level in levels if brightest <= level), brightest)


def _reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return f"Pillow cannot identify it; readable formats include {', '.join(sorted(_common_formats()))}"
    return str(error) or type(error).__name__


def _common_formats() -> set[str]:
    return {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"} & set(Image.registered_extensions().values())


def to_model_input(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """A grayscale picture as Fashion-MNIST would have it, and whether it was negated.

    Negate when the border is light; stretch so the background is 0 and the brightest pixel 255;
    trim the background around the garment; fit the rest into 28x28 keeping its aspect ratio,
    centred on black. A picture where nothing stands out from the background by more than
    ``TRIM_SHARE`` of the range comes back all black.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    inverted = bool(np.median(border) > LIGHT_BACKGROUND)
    if inverted:
        gray, border = 255.0 - gray, 255.0 - border
    background = float(np.median(border))
    span = float(gray.max()) - background
    if span <= TRIM_SHARE * 255.0:
        # Nothing stands out from the background; stretching would blow noise (JPEG's, a sensor's) up
        # into a garment.
        return np.zeros((SIDE, SIDE, 1), dtype=np.float32), inverted
    stretched = np.clip((gray - background) / span, 0.0, 1.0)
    rows, columns = np.nonzero(stretched > TRIM_SHARE)
    garment = stretched[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    fitted = ImageOps.contain(Image.fromarray(np.round(garment * 255).astype(np.uint8)), (SIDE, SIDE), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIDE, SIDE), 0)
    canvas.paste(fitted, ((SIDE - fitted.width) // 2, (SIDE - fitted.height) // 2))
    pixels = np.asarray(canvas, dtype=np.float32) / 255.0
    # Resampling softens the brightest pixels; Fashion-MNIST's reach the top of the range.
    pixels /= max(float(pixels.max()), 1e-6)
    return pixels[..., np.newaxis], inverted


def load_model_input(path: Path) -> ModelInput:
    """Read ``path`` and bring it to the model's input; :class:`ImageReadError` when it is no image or
    holds nothing but background (a model would still name a class for it, with no garment to go on)."""
    pixels, inverted = to_model_input(read_grayscale(path))
    if not pixels.any():
        raise ImageReadError(
            f"{path}: nothing to classify: every pixel is within {TRIM_SHARE:.0%} of the background's shade"
        )
    return ModelInput(path, pixels, inverted)


def write_model_inputs(inputs: Sequence[ModelInput], folder: Path, names: Sequence[str]) -> list[Path]:
    """The 28x28 pictures the model saw, as PNG files named ``names`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item, name in zip(inputs, names, strict=True):
        target = folder / name
        Image.fromarray(np.round(item.pixels[..., 0] * 255).astype(np.uint8)).save(target)
        written.append(target)
    return written
