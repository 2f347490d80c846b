"""Real Fashion-MNIST test images written out the ways a person's pictures differ from the dataset's:
other sizes, PNG and JPEG, colour, inverted (a light background), on a wide canvas, cut out on
transparency, and in the pixel formats beyond 8-bit grey and RGB that Pillow opens (16-bit, 32-bit and
float grey, LAB, CMYK). Each writer takes a 28x28 uint8 image and a path without suffix, and returns the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _same_png(a: np.ndarray, path: Path) -> Path:
    Image.fromarray(a).save(path := path.with_suffix(".png"))
    return path


def _large_png(a: np.ndarray, path: Path) -> Path:
    Image.fromarray(a).resize((84, 84), Image.Resampling.BICUBIC).save(path := path.with_suffix(".png"))
    return path


def _large_jpeg(a: np.ndarray, path: Path) -> Path:
    Image.fromarray(a).resize((100, 100), Image.Resampling.BILINEAR).save(path := path.with_suffix(".jpg"), quality=90)
    return path


def _colour_png(a: np.ndarray, path: Path) -> Path:
    tinted = (a[..., np.newaxis] * np.array([1.0, 0.55, 0.25])).astype(np.uint8)  # an orange garment
    Image.fromarray(tinted).resize((56, 56), Image.Resampling.BICUBIC).save(path := path.with_suffix(".png"))
    return path


def _inverted_png(a: np.ndarray, path: Path) -> Path:
    Image.fromarray(255 - a).resize((64, 64), Image.Resampling.BICUBIC).save(path := path.with_suffix(".png"))
    return path


def _inverted_jpeg_on_wide_canvas(a: np.ndarray, path: Path) -> Path:
    canvas = Image.new("RGB", (150, 90), (255, 255, 255))
    canvas.paste(Image.fromarray(255 - a).resize((70, 70), Image.Resampling.BICUBIC).convert("RGB"), (40, 10))
    canvas.save(path := path.with_suffix(".jpg"), quality=85)
    return path


def _cut_out_png(a: np.ndarray, path: Path) -> Path:
    """A dark-brown garment on a transparent background, as product photos are cut out."""
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = (60, 40, 20)
    rgba[..., 3] = a
    Image.fromarray(rgba).resize((70, 70), Image.Resampling.BICUBIC).save(path := path.with_suffix(".png"))
    return path


VARIANTS: dict[str, Callable[[np.ndarray, Path], Path]] = {
    "same-png": _same_png,
    "large-png": _large_png,
    "large-jpeg": _large_jpeg,
    "colour-png": _colour_png,
    "inverted-png": _inverted_png,
    "inverted-jpeg-wide": _inverted_jpeg_on_wide_canvas,
    "cut-out-png": _cut_out_png,
}


#: Name -> the image in that pixel format, and the file ending it is saved with.
_PIXEL_FORMAT_IMAGES: dict[str, tuple[Callable[[np.ndarray], Image.Image], str]] = {
    "grey-16-bit-png": (lambda a: Image.fromarray(a.astype(np.uint16) * 257), ".png"),  # 255 -> 65535
    "inverted-grey-16-bit-tiff": (lambda a: Image.fromarray((255 - a).astype(np.uint16) * 257).resize((56, 56)), ".tif"),
    "grey-float-tiff": (lambda a: Image.fromarray(a.astype(np.float32) / 255), ".tif"),  # [0, 1], as scientific software writes
    # Floats state no range: centred on zero (a normalised array), or with a pixel the sensor saturated to inf.
    "grey-float-tiff-centred": (lambda a: Image.fromarray(a.astype(np.float32) / 255 - 0.5), ".tif"),
    "grey-float-tiff-one-inf": (lambda a: Image.fromarray(_with_inf_at_brightest(a.astype(np.float32) / 255)), ".tif"),
    "grey-32-bit-tiff": (lambda a: Image.fromarray(a.astype(np.int32)), ".tif"),
    "lab-tiff": (lambda a: Image.fromarray(a).convert("RGB").convert("LAB"), ".tif"),
    "cmyk-jpeg": (lambda a: Image.fromarray(a).convert("CMYK"), ".jpg"),
}


def _with_inf_at_brightest(pixels: np.ndarray) -> np.ndarray:
    pixels.flat[int(np.argmax(pixels))] = np.inf
    return pixels


def _saved(make: Callable[[np.ndarray], Image.Image], suffix: str) -> Callable[[np.ndarray, Path], Path]:
    def write(a: np.ndarray, path: Path) -> Path:
        make(a).save(path := path.with_suffix(suffix))
        return path

    return write


#: Kept apart from VARIANTS, whose writers the 20-image acceptance test takes in turn.
PIXEL_FORMATS: dict[str, Callable[[np.ndarray, Path], Path]] = {
    name: _saved(*spec) for name, spec in _PIXEL_FORMAT_IMAGES.items()
}


def _phone_photo_jpeg(a: np.ndarray, path: Path) -> Path:
    """A 6-megapixel photo: the garment dark on a light, grainy background (sensor noise of +-6 levels)."""
    noise = np.random.default_rng(0).integers(-6, 7, size=(2000, 3000, 3))
    canvas = np.clip(240 + noise, 0, 255).astype(np.uint8)
    garment = np.asarray(Image.fromarray(255 - a).resize((1400, 1400), Image.Resampling.BICUBIC).convert("RGB"))
    canvas[300:1700, 800:2200] = np.minimum(canvas[300:1700, 800:2200], garment)
    Image.fromarray(canvas).save(path := path.with_suffix(".jpg"), quality=90)
    return path


def _large_16_bit_png(a: np.ndarray, path: Path) -> Path:
    """16-bit grey, which Pillow cannot average down: read whole."""
    Image.fromarray(a.astype(np.uint16) * 257).resize((2100, 2100)).save(path := path.with_suffix(".png"))
    return path


def _large_palette_png(a: np.ndarray, path: Path) -> Path:
    """A palette image (GIF-like), whose indices must not be averaged: read whole."""
    Image.fromarray(a).resize((2100, 2100)).convert("P").save(path := path.with_suffix(".png"))
    return path


#: Pictures larger than the working size, which are read at about 1024 pixels a side where they can be.
LARGE_PHOTOS: dict[str, Callable[[np.ndarray, Path], Path]] = {
    "inverted-phone-photo-jpeg": _phone_photo_jpeg,
    "large-16-bit-png": _large_16_bit_png,
    "large-palette-png": _large_palette_png,
}
