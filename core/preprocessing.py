"""How an image becomes a network input. Torch-free, so the gateway can validate and show it.

A checkpoint stores its :class:`Preprocessing` and :mod:`core.transforms` builds every transform
from nothing else, so the preprocessing a model was trained with is the one applied at
inference.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Per-channel RGB statistics of ImageNet, which torchvision's pretrained weights expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: ``stretch`` resizes to ``input_size``×``input_size`` whatever the aspect ratio: aerial scene
#: tiles (UC Merced, AID) are square, so nothing is distorted and nothing is cut away, and the
#: CAM covers the whole image. ``center_crop`` resizes the shorter side to ``input_size`` and
#: keeps the central square, for non-square inputs whose borders may be dropped.
ResizeMode = Literal["stretch", "center_crop"]


class Preprocessing(BaseModel):
    """Resize to ``input_size`` px (see :data:`ResizeMode`), scale to [0, 1], then normalise
    each channel as ``(x - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(default=224, ge=32, le=2048, description="Network input side, px.")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: ResizeMode = "stretch"

    @field_validator("mean")
    @classmethod
    def _finite_mean(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("mean must be finite")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError("std must be finite and positive")
        return value
