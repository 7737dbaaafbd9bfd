"""Transforms built from a Preprocessing: resizing modes, normalisation, and the seeded D4
(flip / 90° rotation) augmentation for overhead imagery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.images import decode_image
from core.preprocessing import IMAGENET_MEAN, Preprocessing
from core.transforms import dihedral, eval_transform, resize_image, train_transform


def _asymmetric() -> torch.Tensor:
    return torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)


def test_eval_transform_on_a_real_scene(ucm_dir: Path) -> None:
    image = decode_image(ucm_dir / "harbor" / "harbor00.jpg")
    pre = Preprocessing(input_size=96)
    tensor = eval_transform(pre)(image)
    assert tensor.shape == (3, 96, 96)
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor, eval_transform(pre)(image))  # deterministic
    # Undoing the normalisation gives back pixel values in [0, 1].
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    pixels = tensor * std + mean
    assert pixels.min() >= -1e-5
    assert pixels.max() <= 1 + 1e-5


def test_normalisation_uses_the_stored_statistics() -> None:
    rgb = tuple(round(m * 255) for m in IMAGENET_MEAN)
    tensor = eval_transform(Preprocessing(input_size=32))(Image.new("RGB", (50, 50), rgb))
    assert tensor.abs().max() < 0.02  # the mean colour maps to ~0
    custom = Preprocessing(input_size=32, mean=(0.0, 0.0, 0.0), std=(0.5, 0.5, 0.5))
    white = eval_transform(custom)(Image.new("RGB", (50, 50), "white"))
    torch.testing.assert_close(white, torch.full((3, 32, 32), 2.0))


def _banded() -> Image.Image:
    """200×100: red left and right eighths, green in between."""
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :25, 0] = pixels[:, 175:, 0] = 255
    pixels[:, 25:175, 1] = 255
    return Image.fromarray(pixels)


def test_stretch_keeps_the_whole_image_and_center_crop_cuts_the_sides() -> None:
    unit = Preprocessing(input_size=40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    stretched = eval_transform(unit)(_banded())
    assert stretched.shape == (3, 40, 40)
    assert stretched[0, :, 0].min() > 0.9  # red borders survive
    cropped = eval_transform(unit.model_copy(update={"resize": "center_crop"}))(_banded())
    assert cropped.shape == (3, 40, 40)
    assert cropped[0].max() < 0.05  # only the green centre is left
    assert cropped[1].min() > 0.95


def test_non_rgb_input_is_converted() -> None:
    tensor = eval_transform(Preprocessing(input_size=32))(Image.new("L", (40, 40), 128))
    assert tensor.shape == (3, 32, 32)


def test_dihedral_group() -> None:
    x = _asymmetric()
    images = [dihedral(x, k) for k in range(8)]
    assert len({tuple(img.flatten().tolist()) for img in images}) == 8  # all distinct
    assert torch.equal(images[0], x)
    assert torch.equal(images[4], torch.flip(x, dims=(-1,)))  # horizontal flip
    assert torch.equal(images[2], torch.flip(x, dims=(-2, -1)))  # 180° rotation
    vertical = torch.flip(x, dims=(-2,))
    assert any(torch.equal(img, vertical) for img in images)
    with pytest.raises(ValueError, match="element"):
        dihedral(x, 8)


def test_train_transform_is_seeded_and_covers_d4(ucm_dir: Path) -> None:
    image = decode_image(ucm_dir / "airplane" / "airplane00.jpg")
    pre = Preprocessing(input_size=32)
    base = eval_transform(pre)(image)
    variants = [dihedral(base, k) for k in range(8)]

    def draws(seed: int) -> list[int]:
        transform = train_transform(pre, generator=torch.Generator().manual_seed(seed))
        out = []
        for _ in range(48):
            tensor = transform(image)
            matches = [k for k, v in enumerate(variants) if torch.equal(tensor, v)]
            assert len(matches) == 1  # every output is exactly one symmetry of the eval output
            out.append(matches[0])
        return out

    first = draws(0)
    assert draws(0) == first
    assert draws(1) != first
    assert set(first) == set(range(8))


def test_train_transform_without_generator_uses_the_global_rng() -> None:
    pre = Preprocessing(input_size=32)
    image = Image.new("RGB", (32, 32))
    image.putpixel((0, 0), (255, 255, 255))
    torch.manual_seed(5)
    first = [train_transform(pre)(image) for _ in range(6)]
    torch.manual_seed(5)
    second = [train_transform(pre)(image) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_repr_names_the_preprocessing() -> None:
    assert "input_size=64" in repr(eval_transform(Preprocessing(input_size=64)))


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_resize_image_can_be_cached(resize: str, ucm_dir: Path) -> None:
    """Transforming the output of resize_image gives the very same tensor (cacheable step)."""
    image = decode_image(ucm_dir / "river" / "river00.jpg").crop((0, 0, 256, 200))
    pre = Preprocessing(input_size=48, resize=resize)  # type: ignore[arg-type]
    resized = resize_image(image, pre)
    assert resized.size == (48, 48)
    assert torch.equal(eval_transform(pre)(resized), eval_transform(pre)(image))
