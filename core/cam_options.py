"""What a client may ask of a CAM computation. Torch-free, so the gateway validates requests
with the very model the engine consumes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: CAM methods the engine ships; ``core.cam`` registers an implementation under each name.
CamMethodName = Literal["cam", "gradcam"]

#: Numeric precision of the forward pass: ``fp32``; ``bf16`` (CPU and CUDA) or ``fp16`` (CUDA
#: only) run it under autocast. Maps are computed and returned in float32 whatever the choice.
CamPrecisionName = Literal["fp32", "bf16", "fp16"]

#: Colormaps offered for heatmap overlays (matplotlib names).
ColormapName = Literal["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray"]


class CamOptions(BaseModel):
    """Options of one CAM request.

    Target selection: ``classes`` names the classes to explain; without it the ``top_k``
    highest-scoring classes are explained (``top_k=1``: the predicted class).

    HAR (Highest Activation Region): the map is min-max normalized and thresholded at
    ``har_threshold`` × its maximum — 0.2 is the localization protocol of Zhou et al. 2016
    (CAM, ref. [15] of the paper); the bounding box of the largest connected component is
    returned, or, with ``har_all_components``, every component of at least ``har_min_area``
    of the image's area.
    """

    model_config = ConfigDict(extra="forbid")

    method: CamMethodName = "cam"
    classes: list[str] | None = Field(
        default=None, min_length=1, max_length=1000, description="Class names to explain."
    )
    top_k: int = Field(default=1, ge=1, le=1000, description="Explain the k best classes.")
    relu: bool = Field(
        default=True, description="Clamp negative evidence to 0 before min-max normalization."
    )
    har_threshold: float = Field(default=0.2, gt=0.0, lt=1.0)
    har_all_components: bool = False
    har_min_area: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Minimum component area, fraction of image."
    )
    colormap: ColormapName = "jet"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="Heatmap opacity.")
    precision: CamPrecisionName = Field(
        default="fp32",
        description=(
            "Forward-pass precision: fp32; bf16 (CPU or CUDA) or fp16 (CUDA only) under autocast,"
            " faster where the hardware supports it, with maps still returned in float32. A"
            " precision the worker's device cannot run fails the job with field 'precision'."
        ),
    )

    @model_validator(mode="after")
    def _classes_or_top_k(self) -> CamOptions:
        if self.classes is not None and "top_k" in self.model_fields_set and self.top_k != 1:
            raise ValueError("give either classes or top_k, not both")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must not repeat a name")
        return self
