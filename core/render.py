"""Pictures and files of class activation maps.

* the overlay: the normalized map through a matplotlib colormap, alpha-blended over the image,
  with the HAR boxes drawn on top — for people;
* the raw map, losslessly: ``.npy`` float32 at feature resolution (the numbers of Eq. 1), and a
  16-bit grayscale PNG of the normalized map at image size (value v ∈ [0, 1] stored as
  round(v · 65535)) that any image tool opens — for programs;
* optionally the HAR mask as a 1-bit PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from core.exceptions import InputError
from core.results import HarBox

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "colorize",
    "har_panel",
    "overlay",
    "read_map_png16",
    "save_map_npy",
    "save_map_png16",
    "save_mask_png",
]

_UINT16_MAX = np.iinfo(np.uint16).max

#: zlib level for artifact PNGs. Level 1 encodes a 256 px overlay in ~12 ms instead of ~42 ms at
#: PIL's default 6 for files ~10 % larger: encoding was most of a one-image job's time in the
#: service (bench/service_latency.py), and PNG stays lossless at any level.
PNG_COMPRESS_LEVEL = 1


def colorize(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """RGB uint8 (H, W, 3) rendering of a normalized map (H, W) through a matplotlib colormap."""
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise InputError(f"unknown colormap {colormap!r}", field="colormap") from None
    rgba = cmap(np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0), bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def overlay(
    image: Image.Image,
    cam: np.ndarray,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    boxes: Sequence[HarBox] = (),
    box_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """``image`` blended with the colorized map at opacity ``alpha`` (0: image only, 1: map
    only), with ``boxes`` outlined. ``cam`` must have the image's size (H, W)."""
    if cam.shape != (image.height, image.width):
        raise InputError(
            f"map shape {cam.shape} does not match image size {image.height}×{image.width}",
            field="cam",
        )
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}", field="alpha")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = colorize(cam, colormap).astype(np.float32)
    blended = np.rint((1.0 - alpha) * base + alpha * heat).clip(0, 255).astype(np.uint8)
    out = Image.fromarray(blended)
    draw = ImageDraw.Draw(out)
    # Lines scale with the image so boxes stay visible on large scenes.
    width = max(1, round(min(image.width, image.height) / 128))
    for box in boxes:
        # PIL's rectangle corners are inclusive; HAR boxes are half-open.
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), outline=box_color, width=width)
    return out


def save_map_npy(raw: np.ndarray, path: str | Path) -> None:
    """Save a raw map as float32 ``.npy`` (lossless; not pickled)."""
    np.save(Path(path), np.asarray(raw, dtype=np.float32), allow_pickle=False)


def save_map_png16(cam: np.ndarray, path: str | Path) -> None:
    """Save a normalized map (values in [0, 1]) as a 16-bit grayscale PNG (mode ``I;16``)."""
    levels = np.rint(np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0) * _UINT16_MAX)
    Image.fromarray(levels.astype(np.uint16)).save(
        Path(path), format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )


def read_map_png16(path: str | Path) -> np.ndarray:
    """Read a map written by :func:`save_map_png16` back to float32 in [0, 1]."""
    with Image.open(Path(path)) as img:
        levels = np.asarray(img, dtype=np.float64)
    return (levels / _UINT16_MAX).astype(np.float32)


def save_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """Save a boolean mask as a 1-bit PNG (white = inside the HAR)."""
    Image.fromarray(np.asarray(mask, dtype=bool)).save(
        Path(path), format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )


def har_panel(image: Image.Image, mask: np.ndarray, boxes: Sequence[HarBox]) -> Image.Image:
    """The image dimmed to 30 % outside the HAR ``mask``, ``boxes`` outlined in yellow — the
    HAR columns of the paper's Figures 3 and 5."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    shaded = np.where(np.asarray(mask, dtype=bool)[..., None], pixels, pixels * 0.3)
    out = Image.fromarray(shaded.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(image.size) / 96))
    for box in boxes:
        # HAR boxes are half-open, PIL's rectangle corners inclusive.
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), outline=(255, 255, 0), width=line)
    return out
