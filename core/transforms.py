"""Image → tensor transforms, built only from a :class:`~core.preprocessing.Preprocessing`.

Training adds the augmentation that suits overhead imagery: a scene seen from above has no
canonical orientation, so any of the 8 symmetries of the square (the dihedral group D4: four 90°
rotations, each with or without a horizontal flip — which also covers vertical flips) is as
plausible as the original. They are applied to the tensor, losslessly, after resizing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from core.preprocessing import Preprocessing

__all__ = [
    "ImageTransform",
    "dihedral",
    "eval_transform",
    "resize_image",
    "train_transform",
]

ImageTransform = Callable[[Image.Image], Tensor]

#: Number of elements of D4, the symmetry group of the square.
_D4_ORDER = 8


class _Transform(ABC):
    """Resize, convert to a C×H×W float tensor in [0, 1], augment, normalise."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, image: Image.Image) -> Tensor:
        tensor = self._augment(TF.to_tensor(resize_image(image, self.pre)))
        return TF.normalize(tensor, list(self.pre.mean), list(self.pre.std))

    @abstractmethod
    def _augment(self, tensor: Tensor) -> Tensor:
        """Augment a C×H×W tensor in [0, 1] (the identity at evaluation)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pre!r})"


class _EvalTransform(_Transform):
    def _augment(self, tensor: Tensor) -> Tensor:
        return tensor


class _TrainTransform(_Transform):
    def __init__(self, pre: Preprocessing, generator: torch.Generator | None) -> None:
        super().__init__(pre)
        self.generator = generator

    def _augment(self, tensor: Tensor) -> Tensor:
        element = int(torch.randint(_D4_ORDER, (1,), generator=self.generator).item())
        return dihedral(tensor, element)


def resize_image(image: Image.Image, pre: Preprocessing) -> Image.Image:
    """The geometric step of every transform: an RGB ``input_size``² image, stretched or
    centre-cropped per ``pre.resize``. Resizing an image that already has that size returns an
    exact copy, so callers may cache this step's output and still get identical tensors."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = pre.input_size
    # PIL's bilinear filter covers the whole source footprint, i.e. it antialiases when
    # shrinking (UC Merced's 256 px → 224 px); torchvision's flag keeps that explicit.
    if pre.resize == "stretch":
        return TF.resize(image, [size, size], InterpolationMode.BILINEAR, antialias=True)
    image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(image, [size, size])


def dihedral(tensor: Tensor, element: int) -> Tensor:
    """Apply element ``0 ≤ element < 8`` of D4 to the last two (H, W) dimensions: a horizontal
    flip when ``element ≥ 4``, then ``element % 4`` counter-clockwise quarter turns."""
    if not 0 <= element < _D4_ORDER:
        raise ValueError(f"element must be in [0, {_D4_ORDER}), got {element}")
    if element >= 4:
        tensor = torch.flip(tensor, dims=(-1,))
    return torch.rot90(tensor, element % 4, dims=(-2, -1))


def eval_transform(pre: Preprocessing) -> ImageTransform:
    """Deterministic inference transform: resize, to tensor, normalise."""
    return _EvalTransform(pre)


def train_transform(
    pre: Preprocessing, *, generator: torch.Generator | None = None
) -> ImageTransform:
    """Training transform: :func:`eval_transform` plus a uniformly drawn D4 symmetry (random
    flips and 90° rotations). With ``generator`` the draws are reproducible; without it they use
    torch's global RNG, which DataLoader seeds differently in each worker process (a generator
    passed here would be copied into every worker and repeat the same draws)."""
    return _TrainTransform(pre, generator)
