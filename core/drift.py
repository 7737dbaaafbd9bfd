"""CAM drift: how far the class activation maps of a damaged network moved from the intact ones.

Maps are compared as they are shown and as HAR reads them (:mod:`core.explain`): the raw map
``F_c`` of Eq. 1 bilinearly upsampled to the compared size, ReLU, min-max normalized to [0, 1]
(:func:`core.cam.normalize`). Four per-image measures, each with a defined "no change" value:

* **correlation** — Pearson's r between the two maps' pixels (1: same shape up to scale);
  undefined (NaN) when either map is constant;
* **HAR box IoU** — intersection over union of the bounding boxes of the largest HAR component
  (:func:`core.har.highest_activation_regions`, Zhou et al.'s protocol); 0 when only one map has
  a region, NaN when neither has;
* **mask IoU** — IoU of the whole thresholded regions ``map > threshold · max`` (every component,
  not only the largest); NaN when both are empty;
* **peak shift** — Euclidean distance in pixels between the two maps' maxima (first maximum in
  raster order); NaN when either map is flat (no peak).

Undefined values are NaN here and left out of means (:meth:`Drift.means`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.cam import normalize, upsample
from core.exceptions import InputError
from core.har import highest_activation_regions
from core.results import HarBox

__all__ = [
    "Drift",
    "MapSet",
    "box_iou",
    "cam_drift",
    "correlation",
    "describe_maps",
    "mask_iou",
    "peak_shift",
    "prepare_maps",
]


@dataclass(frozen=True)
class MapSet:
    """Normalized maps (N, H, W) in [0, 1] and what the drift measures read from them: the
    thresholded ``masks``, the largest HAR component's box per map (None without a region) and
    the ``peaks`` as (row, column), NaN for a flat map."""

    maps: Tensor
    masks: Tensor
    boxes: list[HarBox | None]
    peaks: Tensor

    def __len__(self) -> int:
        return self.maps.shape[0]


def prepare_maps(raw: Tensor, size: tuple[int, int], *, threshold: float = 0.2) -> MapSet:
    """Raw maps (N, h, w) → upsampled to ``size`` = (H, W), normalized, described."""
    if raw.ndim != 3:
        raise InputError(f"expected raw maps N×h×w, got {tuple(raw.shape)}", field="maps")
    return describe_maps(normalize(upsample(raw, size), relu=True), threshold=threshold)


def describe_maps(maps: Tensor, *, threshold: float = 0.2) -> MapSet:
    """Masks, HAR boxes and peaks of normalized maps (N, H, W) with values in [0, 1]."""
    if maps.ndim != 3:
        raise InputError(f"expected maps N×H×W, got {tuple(maps.shape)}", field="maps")
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold must be in (0, 1), got {threshold}", field="har_threshold")
    maps = maps.detach().float().cpu()
    high = maps.flatten(1).amax(dim=1)
    # The cut of core.har, in float32: a pixel equal to threshold × max is not above it.
    masks = maps > (torch.tensor(threshold, dtype=torch.float32) * high)[:, None, None]
    boxes = [_largest_box(m, threshold) for m in maps.numpy()]
    flat_index = maps.flatten(1).argmax(dim=1)
    peaks = torch.stack([flat_index // maps.shape[2], flat_index % maps.shape[2]], dim=1).double()
    peaks[high <= 0] = math.nan
    return MapSet(maps=maps, masks=masks, boxes=boxes, peaks=peaks)


def _largest_box(cam: np.ndarray, threshold: float) -> HarBox | None:
    boxes = highest_activation_regions(cam, threshold=threshold).boxes
    return boxes[0] if boxes else None


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson's r of each pair of maps (N, H, W), in float64; NaN where a map is constant."""
    x = a.flatten(1).double()
    y = b.flatten(1).double()
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    denominator = (x.square().sum(dim=1) * y.square().sum(dim=1)).sqrt()
    r = (x * y).sum(dim=1) / denominator
    return torch.where(denominator > 0, r.clamp(-1.0, 1.0), math.nan)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each pair of boolean masks (N, H, W); NaN where both are empty."""
    inter = (a & b).flatten(1).sum(dim=1).double()
    union = (a | b).flatten(1).sum(dim=1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), math.nan)


def box_iou(a: HarBox | None, b: HarBox | None) -> float:
    """IoU of two half-open boxes; 0 when one is missing, NaN when both are."""
    if a is None or b is None:
        return math.nan if a is b else 0.0
    width = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    height = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = width * height
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else math.nan


def _area(box: HarBox) -> int:
    return (box.x1 - box.x0) * (box.y1 - box.y0)


def peak_shift(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance in pixels between peaks (N, 2); NaN where either is missing."""
    return (a.double() - b.double()).square().sum(dim=1).sqrt()


@dataclass(frozen=True)
class Drift:
    """Per-image drift measures (N,) of one network against the intact one, float64."""

    cam_correlation: Tensor
    har_box_iou: Tensor
    mask_iou: Tensor
    peak_shift_px: Tensor

    def means(self) -> dict[str, float | None]:
        """Mean of each measure over the images where it is defined (None when nowhere)."""
        return {
            name: _nanmean(getattr(self, name))
            for name in ("cam_correlation", "har_box_iou", "mask_iou", "peak_shift_px")
        }


def _nanmean(values: Tensor) -> float | None:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else None


def cam_drift(reference: MapSet, other: MapSet) -> Drift:
    """The four drift measures of ``other`` against ``reference`` (same N, H, W)."""
    if reference.maps.shape != other.maps.shape:
        raise InputError(
            f"cannot compare maps of shapes {tuple(reference.maps.shape)} and "
            f"{tuple(other.maps.shape)}",
            field="maps",
        )
    boxes = [box_iou(a, b) for a, b in zip(reference.boxes, other.boxes, strict=True)]
    return Drift(
        cam_correlation=correlation(reference.maps, other.maps),
        har_box_iou=torch.tensor(boxes, dtype=torch.float64),
        mask_iou=mask_iou(reference.masks, other.masks),
        peak_shift_px=peak_shift(reference.peaks, other.peaks),
    )
