"""JSON result schema of CAM/HAR computations. Torch-free, shared by the CLI, the worker and the
gateway's response models, so every surface emits the same documented shape.

Coordinates are pixels of the *original* image (before any resize), origin top-left, boxes
half-open: ``x0 <= x < x1`` and ``y0 <= y < y1`` (so width is ``x1 - x0``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HarBox(BaseModel):
    """One connected region of the thresholded CAM."""

    model_config = ConfigDict(extra="forbid")

    x0: int = Field(ge=0)
    y0: int = Field(ge=0)
    x1: int = Field(ge=0)
    y1: int = Field(ge=0)
    area: int = Field(ge=0, description="Pixels inside the component (not the box).")
    activation_share: float = Field(
        ge=0.0, le=1.0, description="Share of the map's total (normalized) activation inside it."
    )
    peak: float = Field(description="Highest normalized map value inside the component.")


class ClassScore(BaseModel):
    """A class and the model's softmax probability for it."""

    model_config = ConfigDict(extra="forbid")

    label: str
    index: int = Field(ge=0)
    probability: float = Field(ge=0.0, le=1.0)


class ClassCam(BaseModel):
    """The CAM of one class for one image, summarized by its HAR boxes."""

    model_config = ConfigDict(extra="forbid")

    target: ClassScore
    method: str
    threshold: float
    boxes: list[HarBox] = Field(description="Largest component first.")
    map_min: float = Field(description="Raw map minimum, before normalization.")
    map_max: float = Field(description="Raw map maximum, before normalization.")
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="Artifact kind → file name (overlay, raw map, mask)."
    )


class ImageCam(BaseModel):
    """Everything computed for one image under one model condition."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Client-facing image name.")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    prediction: ClassScore
    top_k: list[ClassScore]
    cams: list[ClassCam]
