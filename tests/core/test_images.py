"""Image decoding: the real UC Merced TIFFs and JPEGs, truncated copies of them, generated images
for each pixel mode, and the size guard (checked from the header, before decoding)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.exceptions import ImageDecodeError, ImageTooLargeError, InputError
from core.images import DEFAULT_MAX_PIXELS, decode_image

UCM_TIFS = ["airplane00", "baseballdiamond00", "harbor00", "storagetanks00"]


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("stem", UCM_TIFS)
def test_real_ucm_tiffs_decode_like_their_jpeg_copies(
    stem: str, ucm_tif_dir: Path, ucm_dir: Path
) -> None:
    tif = decode_image(ucm_tif_dir / f"{stem}.tif")
    assert tif.mode == "RGB"
    assert tif.size == (256, 256)
    # ucm/ holds the same scenes re-encoded as JPEG (quality 92): same picture, small error.
    jpg = decode_image(ucm_dir / stem.rstrip("0123456789") / f"{stem}.jpg")
    assert jpg.size == tif.size
    assert np.abs(_pixels(tif) - _pixels(jpg)).mean() < 4


def test_bytes_and_path_give_the_same_image(ucm_tif_dir: Path) -> None:
    path = ucm_tif_dir / "harbor00.tif"
    from_bytes = decode_image(path.read_bytes(), name="harbor00.tif")
    assert np.array_equal(_pixels(from_bytes), _pixels(decode_image(path)))
    assert from_bytes.getpixel((0, 0)) is not None  # fully loaded, detached from any file


@pytest.mark.parametrize(
    "path_of",
    [
        lambda tif, _ucm: tif / "airplane00.tif",
        lambda _tif, ucm: ucm / "airplane" / "airplane00.jpg",
    ],
    ids=["tiff", "jpeg"],
)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_real_images_fail(
    path_of: object, keep: float, ucm_tif_dir: Path, ucm_dir: Path
) -> None:
    data = path_of(ucm_tif_dir, ucm_dir).read_bytes()  # type: ignore[operator]
    with pytest.raises(ImageDecodeError, match=r"'scene\.x'") as info:
        decode_image(data[: int(len(data) * keep)], name="scene.x")
    assert "truncated" in str(info.value)
    assert info.value.field == "image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is plainly text and not an image" * 4, "not a JPEG/PNG/TIFF"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 16, "cannot decode"),  # a JPEG signature and no more
    ],
)
def test_non_images_fail_with_the_name(content: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(content, name="upload-3")
    assert "upload-3" in str(info.value)


def test_other_formats_are_not_decoded() -> None:
    gif = _encode(Image.new("RGB", (8, 8), "red"), "GIF")
    assert Image.open(io.BytesIO(gif)).format == "GIF"  # PIL itself would read it
    with pytest.raises(ImageDecodeError, match="not a JPEG"):
        decode_image(gif)


def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(ImageDecodeError, match=r"nowhere\.jpg"):
        decode_image(missing)


def test_oversized_image_is_refused_with_size_and_limit() -> None:
    data = _encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, max_pixels=50_000, name="big.png")
    message = str(info.value)
    assert "300×200" in message
    assert "50,000" in message
    assert "big.png" in message
    assert decode_image(data, max_pixels=60_000).size == (300, 200)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and has no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_size_is_checked_before_decoding() -> None:
    """A bomb is refused from its header (a decode attempt would fail differently)."""
    bomb = _png_header_only(8000, 8000)  # 64 Mpx: under PIL's own global limit
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match="8000×8000"):
        decode_image(bomb)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, max_pixels=10**8)  # allowed size: now decoding fails for real
    assert not isinstance(info.value, ImageTooLargeError)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # the guard is per call, not global


def test_pil_global_bomb_guard_is_reported_as_too_large() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_header_only(20000, 20000), max_pixels=10**9)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_max_pixels_is_validated(bad: object) -> None:
    with pytest.raises(InputError) as info:
        decode_image(b"x", max_pixels=bad)  # type: ignore[arg-type]
    assert info.value.field == "max_pixels"


def test_default_limit_fits_aerial_tiles() -> None:
    assert DEFAULT_MAX_PIXELS >= 10_000 * 1_000  # far above UCM (256²) and AID (600²) tiles


# --- pixel modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "1"])
def test_single_channel_is_replicated(mode: str) -> None:
    grey = Image.new(mode, (4, 3), 200 if mode == "L" else 1)
    image = decode_image(_encode(grey, "PNG"))
    assert image.mode == "RGB"
    expected = 200 if mode == "L" else 255
    assert np.all(_pixels(image) == expected)


def test_alpha_is_composited_on_black() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: black
    rgba[0, 2] = (200, 100, 50, 128)  # half: half
    image = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    pixels = _pixels(image)[0]
    assert pixels[0].tolist() == [200, 100, 50]
    assert pixels[1].tolist() == [0, 0, 0]
    assert np.abs(pixels[2] - np.array([100, 50, 25])).max() <= 1


def test_grey_with_alpha_is_composited_on_black() -> None:
    la = Image.merge("LA", (Image.new("L", (2, 1), 180), Image.new("L", (2, 1), 0)))
    la.putpixel((0, 0), (180, 255))
    pixels = _pixels(decode_image(_encode(la, "PNG")))[0]
    assert pixels.tolist() == [[180, 180, 180], [0, 0, 0]]


def test_palette_transparency_is_composited_on_black() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    data = _encode(palette, "PNG", transparency=1)
    pixels = _pixels(decode_image(data))[0]
    assert pixels.tolist() == [[255, 0, 0], [0, 0, 0]]
    opaque = _pixels(decode_image(_encode(palette, "PNG")))[0]
    assert opaque.tolist() == [[255, 0, 0], [0, 255, 0]]


def test_16_bit_is_scaled_from_its_nominal_range() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = _pixels(decode_image(data))[0]
    assert pixels[:, 0].tolist() == [0, 100, 255]
    assert np.all(pixels == pixels[:, :1])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[-1000, 0, 1000]], dtype=np.int32), [0, 128, 255]),
        (np.array([[0.5, 1.0, 1.5]], dtype=np.float32), [0, 128, 255]),
        (np.array([[7.0, 7.0, 7.0]], dtype=np.float32), [0, 0, 0]),
        (np.array([[np.nan, 2.0, 4.0]], dtype=np.float32), [0, 0, 255]),
    ],
    ids=["int32", "float", "constant", "nan"],
)
def test_32_bit_images_are_stretched(values: np.ndarray, expected: list[int]) -> None:
    data = _encode(Image.fromarray(values), "TIFF")
    pixels = _pixels(decode_image(data))[0]
    assert pixels[:, 0].tolist() == expected


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    image = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    red, green, blue = _pixels(image)[2, 2]
    assert red > 200
    assert green < 60
    assert blue < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = _encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    assert decode_image(data).size == (20, 40)
