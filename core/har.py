"""Highest Activation Region (HAR): where a class activation map localizes the class.

Implements the localization protocol of Zhou et al. 2016 (CAM, ref. [15] of the paper), which
the paper's HAR columns (Fig. 5) follow: keep the pixels of the normalized map *above*
``threshold`` × its maximum (0.2 in Zhou et al.), split them into connected components and take
the bounding box of the largest. Components are 8-connected (pixels touching only at a corner
belong together), as a blob of heat is one region however its edge is rasterized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.exceptions import InputError
from core.results import HarBox

__all__ = ["Har", "highest_activation_regions"]

#: 8-connectivity: the full 3×3 neighbourhood.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Har:
    """The HAR boxes of one map, largest component first, and the boolean mask (H, W) of the
    components they bound (the union of the returned components, not the whole threshold)."""

    boxes: list[HarBox]
    mask: np.ndarray


def highest_activation_regions(
    cam: np.ndarray,
    *,
    threshold: float = 0.2,
    all_components: bool = False,
    min_area: float = 0.0,
) -> Har:
    """HAR of a normalized map ``cam`` (H, W), non-negative, at the original image's size.

    Pixels with ``cam > threshold * cam.max()`` form the regions. Without ``all_components`` the
    largest component (most pixels; ties: most activation) is returned; with it, every component
    of at least ``min_area`` × H·W pixels, largest first. Each :class:`HarBox` holds the
    half-open bounding box in pixels, the component's pixel count, its share of the map's total
    activation and its peak value. An all-zero map has no region.
    """
    cam = _check_map(cam, threshold, min_area)
    height, width = cam.shape
    peak = float(cam.max())
    if peak <= 0:
        return Har(boxes=[], mask=np.zeros(cam.shape, dtype=bool))
    # The cut-off is computed in the map's own precision, so a float32 pixel equal to
    # threshold × max is "at", not "above", it.
    cutoff = cam.dtype.type(threshold) * cam.dtype.type(peak)
    labels, count = ndimage.label(cam > cutoff, structure=_EIGHT_CONNECTED)
    flat_labels = labels.ravel()
    areas = np.bincount(flat_labels, minlength=count + 1)[1:]
    sums = np.bincount(flat_labels, weights=cam.ravel(), minlength=count + 1)[1:]
    # Largest first; ties broken by activation, then by label (raster order) for determinism.
    order = np.lexsort((np.arange(count), -sums, -areas))
    if all_components:
        chosen = [int(i) for i in order if areas[i] >= min_area * height * width]
    else:
        chosen = [int(i) for i in order[:1]]
    total = float(cam.sum(dtype=np.float64))
    slices = ndimage.find_objects(labels)
    mask = np.zeros(cam.shape, dtype=bool)
    boxes = []
    for i in chosen:
        # Only the chosen components are visited, each within its own bounding box.
        window = slices[i]
        inside = labels[window] == i + 1
        mask[window] |= inside
        top = float(cam[window][inside].max())
        boxes.append(_box(window, int(areas[i]), float(sums[i]) / total, top))
    return Har(boxes=boxes, mask=mask)


def _box(window: tuple[slice, ...], area: int, share: float, peak: float) -> HarBox:
    rows, cols = window
    return HarBox(
        x0=int(cols.start),
        y0=int(rows.start),
        x1=int(cols.stop),
        y1=int(rows.stop),
        area=area,
        activation_share=min(max(share, 0.0), 1.0),  # float rounding must not break [0, 1]
        peak=peak,
    )


def _check_map(cam: np.ndarray, threshold: float, min_area: float) -> np.ndarray:
    cam = np.asarray(cam)
    if not np.issubdtype(cam.dtype, np.floating):
        cam = cam.astype(np.float64)
    if cam.ndim != 2 or cam.size == 0:
        raise InputError(f"a HAR needs a non-empty 2-D map, got shape {cam.shape}", field="cam")
    if not np.isfinite(cam).all() or cam.min() < 0:
        raise InputError("a HAR needs a finite, non-negative (normalized) map", field="cam")
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold must be in (0, 1), got {threshold}", field="har_threshold")
    if not 0.0 <= min_area <= 1.0:
        raise InputError(f"min_area must be in [0, 1], got {min_area}", field="har_min_area")
    return cam
