from __future__ import annotations

import math

import pytest
import torch

from core.drift import (
    MapSet,
    box_iou,
    cam_drift,
    correlation,
    describe_maps,
    mask_iou,
    peak_shift,
    prepare_maps,
)
from core.exceptions import InputError
from core.results import HarBox

SIZE = 48


def blob(row: float, col: float, sigma: float = 4.0) -> torch.Tensor:
    """A normalized Gaussian bump (max 1) centred on a pixel."""
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    bump = torch.exp(-((ys - row) ** 2 + (xs - col) ** 2) / (2 * sigma**2))
    return bump / bump.max()


def box(x0: int, y0: int, x1: int, y1: int) -> HarBox:
    return HarBox(
        x0=x0, y0=y0, x1=x1, y1=y1, area=(x1 - x0) * (y1 - y0), activation_share=1.0, peak=1.0
    )


def maps_of(*maps: torch.Tensor) -> MapSet:
    return describe_maps(torch.stack(maps))


def test_identical_maps_do_not_drift() -> None:
    a = maps_of(blob(10, 30), blob(24, 24, sigma=6))
    drift = cam_drift(a, a)
    assert drift.cam_correlation.tolist() == pytest.approx([1.0, 1.0])
    assert drift.har_box_iou.tolist() == [1.0, 1.0]
    assert drift.mask_iou.tolist() == [1.0, 1.0]
    assert drift.peak_shift_px.tolist() == [0.0, 0.0]
    assert drift.means() == pytest.approx(
        {"cam_correlation": 1.0, "har_box_iou": 1.0, "mask_iou": 1.0, "peak_shift_px": 0.0}
    )


def test_a_shifted_blob_moves_its_peak_by_the_shift() -> None:
    # A 3-4-5 triangle: 3 rows down, 4 columns right.
    drift = cam_drift(maps_of(blob(20, 20)), maps_of(blob(23, 24)))
    assert drift.peak_shift_px.item() == pytest.approx(5.0)
    assert 0.0 < drift.cam_correlation.item() < 1.0
    assert 0.0 < drift.mask_iou.item() < 1.0
    assert 0.0 < drift.har_box_iou.item() < 1.0


def test_peaks_are_read_as_row_and_column() -> None:
    described = maps_of(blob(7, 31))
    assert described.peaks.tolist() == [[7.0, 31.0]]


def test_far_apart_blobs_share_no_region() -> None:
    drift = cam_drift(maps_of(blob(6, 6, sigma=2)), maps_of(blob(40, 40, sigma=2)))
    assert drift.har_box_iou.item() == 0.0
    assert drift.mask_iou.item() == 0.0
    assert drift.peak_shift_px.item() == pytest.approx(34 * math.sqrt(2))


def test_box_iou_known_values() -> None:
    assert box_iou(box(0, 0, 10, 10), box(20, 20, 30, 30)) == 0.0  # disjoint
    assert box_iou(box(0, 0, 10, 10), box(10, 0, 20, 10)) == 0.0  # touching, half-open
    assert box_iou(box(0, 0, 10, 10), box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou(box(0, 0, 10, 10), box(2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou(box(0, 0, 10, 10), None) == 0.0
    assert math.isnan(box_iou(None, None))


def test_mask_iou_known_values() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True  # 8 pixels
    b[0, 1:3] = True  # 8 pixels, 4 shared
    iou = mask_iou(a, b)
    assert iou[0].item() == pytest.approx(4 / 12)
    assert math.isnan(iou[1].item())  # both empty


def test_correlation_of_opposite_and_constant_maps() -> None:
    ramp = torch.linspace(0, 1, SIZE).expand(SIZE, SIZE)
    r = correlation(torch.stack([ramp, ramp, ramp]), torch.stack([1 - ramp, 3 * ramp, ramp * 0]))
    assert r[0].item() == pytest.approx(-1.0)
    assert r[1].item() == pytest.approx(1.0)  # invariant to scale
    assert math.isnan(r[2].item())  # a constant map has no correlation


def test_a_flat_map_has_no_peak_region_or_correlation() -> None:
    intact = maps_of(blob(20, 20))
    flat = maps_of(torch.zeros(SIZE, SIZE))
    assert flat.boxes == [None]
    assert not flat.masks.any()
    drift = cam_drift(intact, flat)
    assert math.isnan(drift.cam_correlation.item())
    assert math.isnan(drift.peak_shift_px.item())
    assert drift.har_box_iou.item() == 0.0
    assert drift.mask_iou.item() == 0.0
    means = drift.means()
    assert means["cam_correlation"] is None
    assert means["peak_shift_px"] is None
    assert means["mask_iou"] == 0.0


def test_means_skip_undefined_images() -> None:
    intact = maps_of(blob(20, 20), blob(20, 20))
    other = maps_of(blob(23, 24), torch.zeros(SIZE, SIZE))
    assert cam_drift(intact, other).means()["peak_shift_px"] == pytest.approx(5.0)


def test_masks_follow_the_har_threshold() -> None:
    ramp = torch.linspace(0, 1, SIZE).expand(SIZE, SIZE)
    low = describe_maps(ramp[None], threshold=0.2).masks.sum().item()
    high = describe_maps(ramp[None], threshold=0.8).masks.sum().item()
    assert high < low
    cut = describe_maps(ramp[None], threshold=0.5)
    assert cut.masks.equal(ramp[None] > 0.5)
    assert cut.boxes[0] is not None
    assert cut.boxes[0].x0 == int((ramp[0] > 0.5).nonzero()[0])


def test_prepare_maps_upsamples_and_normalizes() -> None:
    raw = torch.tensor([[[0.0, 2.0], [-1.0, 4.0]]])
    prepared = prepare_maps(raw, (8, 8))
    assert prepared.maps.shape == (1, 8, 8)
    assert prepared.maps.min() == 0.0
    assert prepared.maps.max() == pytest.approx(1.0)
    # The hottest cell (bottom right) covers a 2×2 plateau of pixels 6–7 after bilinear
    # upsampling (align_corners=False clamps at the border); the first in raster order wins.
    assert prepared.maps[0, 6:, 6:].eq(1.0).all()
    assert prepared.peaks.tolist() == [[6.0, 6.0]]


def test_shapes_are_checked() -> None:
    with pytest.raises(InputError):
        cam_drift(maps_of(blob(1, 1)), maps_of(blob(1, 1), blob(2, 2)))
    with pytest.raises(InputError):
        prepare_maps(torch.zeros(2, 2), (4, 4))
    with pytest.raises(InputError):
        describe_maps(torch.zeros(1, 4, 4), threshold=1.5)
    assert peak_shift(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])).item() == 5.0
