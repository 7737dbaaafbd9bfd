"""Decode untrusted image bytes into fully loaded 8-bit RGB PIL images.

Every image a client uploads goes through :func:`decode_image`, so it is strict:

* only JPEG, PNG, TIFF, BMP and WebP decoders are tried (fewer parsers, less attack surface);
* the pixel count from the header is checked against ``max_pixels`` *before* any pixel data is
  decoded — per call, without touching PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` (PIL's own
  global guard still applies on top and is reported the same way);
* the image is decoded completely (``load()``), so a truncated file fails here rather than later
  in a worker; this relies on PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``, which
  camres never changes;
* the result is always RGB: greyscale and bilevel images are replicated to three channels;
  images with an alpha channel (RGBA, LA, PA, palette with transparency) are composited on
  black, since transparent pixels in aerial tiles are no-data areas, which are conventionally
  black; 16-bit images are scaled from their nominal range (``v / 257``, exact for 8-bit data
  stored in 16 bits) and 32-bit integer or float images, which have no nominal range, by their
  own min–max; EXIF orientation is applied.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from core.exceptions import ImageDecodeError, ImageTooLargeError, InputError

__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "decode_image"]

#: 40 megapixels: ~120 MB as RGB; far above any aerial scene tile (UC Merced 256², AID 600²).
DEFAULT_MAX_PIXELS = 40_000_000

#: PIL format names :func:`decode_image` accepts (WebP only when PIL was built with it).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")

# What PIL raises on malformed input (its fuzzing harness tolerates the same set); anything else
# is a bug worth seeing.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` (raw bytes or a file path) into a fully loaded RGB image.

    ``name`` identifies the image in error messages (default: the path, or ``"image"``).
    Raises :class:`ImageTooLargeError` when width × height exceeds ``max_pixels`` and
    :class:`ImageDecodeError` for anything that is not a complete image of an allowed format.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError(
            f"max_pixels must be a positive integer, got {max_pixels!r}", field="max_pixels"
        )
    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "image"
        data = bytes(source)
    elif isinstance(source, str | Path):
        label = name or str(source)
        data = _read_file(Path(source), label)
    else:
        raise InputError(
            f"cannot decode a {type(source).__name__}; give bytes or a path", field="image"
        )
    if not data:
        raise ImageDecodeError(
            f"cannot decode image {label!r}: it is empty (0 bytes)", field="image"
        )
    return _decode(data, label, max_pixels)


def _read_file(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image {label!r}: {exc}", field="image") from exc


def _decode(data: bytes, label: str, max_pixels: int) -> Image.Image:
    formats = _available_formats()
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            _check_size(image.size, label, max_pixels)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image), label)
    except Image.DecompressionBombError as exc:  # PIL's global guard, before ours can run
        raise ImageTooLargeError(f"image {label!r} is too large: {exc}", field="image") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"cannot decode image {label!r}: not a {'/'.join(formats)} image", field="image"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(
            f"cannot decode image {label!r}: corrupt or truncated ({exc})", field="image"
        ) from exc


def _available_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin once; a no-op afterwards
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _check_size(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image {label!r} has an empty size {width}×{height}", field="image")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {label!r} is {width}×{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}",
            field="image",
        )


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode in _16BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(
            f"image {label!r} has unsupported mode {mode}", field="image"
        ) from exc


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth greyscale array to uint8 (see the module docstring); NaNs → 0."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode in _16BIT_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
