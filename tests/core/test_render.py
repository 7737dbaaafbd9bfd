from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from core.exceptions import InputError
from core.render import (
    colorize,
    overlay,
    read_map_png16,
    save_map_npy,
    save_map_png16,
    save_mask_png,
)
from core.results import HarBox


@pytest.fixture
def ramp() -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (24, 1))


@pytest.fixture
def photo(ucm_dir: Path) -> Image.Image:
    with Image.open(ucm_dir / "harbor" / "harbor00.jpg") as img:
        return img.convert("RGB").resize((32, 24))


def test_colorize_uses_the_named_matplotlib_colormap(ramp: np.ndarray) -> None:
    rgb = colorize(ramp, "viridis")
    assert rgb.shape == (24, 32, 3)
    assert rgb.dtype == np.uint8
    expected = matplotlib.colormaps["viridis"](ramp[0], bytes=True)[:, :3]
    np.testing.assert_array_equal(rgb[5], expected)
    assert not np.array_equal(colorize(ramp, "jet"), rgb)
    with pytest.raises(InputError) as info:
        colorize(ramp, "no-such-map")
    assert info.value.field == "colormap"


def test_overlay_blends_with_alpha(photo: Image.Image, ramp: np.ndarray) -> None:
    base = np.asarray(photo, dtype=np.float64)
    heat = colorize(ramp, "jet").astype(np.float64)
    np.testing.assert_array_equal(np.asarray(overlay(photo, ramp, alpha=0.0)), base)
    np.testing.assert_array_equal(np.asarray(overlay(photo, ramp, alpha=1.0)), heat)
    half = np.asarray(overlay(photo, ramp, alpha=0.25), dtype=np.float64)
    assert np.abs(half - (0.75 * base + 0.25 * heat)).max() <= 0.5 + 1e-9


def test_overlay_draws_half_open_boxes(photo: Image.Image, ramp: np.ndarray) -> None:
    box = HarBox(x0=4, y0=3, x1=20, y1=15, area=1, activation_share=0.5, peak=1.0)
    drawn = np.asarray(overlay(photo, ramp, alpha=0.0, boxes=[box], box_color=(255, 0, 255)))
    magenta = np.all(drawn == (255, 0, 255), axis=-1)
    ys, xs = np.nonzero(magenta)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (4, 3, 19, 14)  # last pixel is x1 - 1
    assert magenta[3, 4:20].all()
    assert magenta[14, 4:20].all()
    assert not magenta[5:13, 6:18].any()  # only the outline


def test_overlay_rejects_a_map_of_another_size(photo: Image.Image) -> None:
    with pytest.raises(InputError) as info:
        overlay(photo, np.zeros((32, 24)))
    assert info.value.field == "cam"


def test_png16_round_trip_is_within_one_level(tmp_path: Path) -> None:
    cam = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    cam[0, 0], cam[0, 1] = 0.0, 1.0
    path = tmp_path / "map16.png"
    save_map_png16(cam, path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        assert img.size == (53, 37)
        levels = np.asarray(img)
    assert levels.dtype == np.uint16
    assert (levels.min(), levels.max()) == (0, 65535)
    back = read_map_png16(path)
    assert back.dtype == np.float32
    assert np.abs(back - cam).max() <= 1 / 65535


def test_npy_is_float32_and_exact(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).normal(size=(7, 7))
    save_map_npy(raw, tmp_path / "map.npy")
    back = np.load(tmp_path / "map.npy", allow_pickle=False)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, raw.astype(np.float32))


def test_mask_png_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    save_mask_png(mask, tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as img:
        np.testing.assert_array_equal(np.asarray(img, dtype=bool), mask)
