from __future__ import annotations

import numpy as np
import pytest

from core.exceptions import InputError
from core.har import highest_activation_regions
from core.results import HarBox


def blank(h: int = 40, w: int = 50) -> np.ndarray:
    return np.zeros((h, w), dtype=np.float32)


def test_one_blob_gives_its_half_open_box() -> None:
    cam = blank()
    cam[10:20, 5:15] = 1.0
    har = highest_activation_regions(cam)
    assert har.boxes == [
        HarBox(x0=5, y0=10, x1=15, y1=20, area=100, activation_share=1.0, peak=1.0)
    ]
    assert har.mask.dtype == bool
    assert har.mask.sum() == 100
    assert har.mask[10:20, 5:15].all()


def test_two_blobs_largest_first_and_min_area() -> None:
    cam = blank()
    cam[0:4, 0:5] = 0.5  # 20 px, activation 10
    cam[20:30, 30:36] = 1.0  # 60 px, activation 60
    cam[35, 45] = 0.1  # below 0.2 × max: background, but counted in the total
    total = 10 + 60 + 0.1

    largest = highest_activation_regions(cam)
    assert [(b.x0, b.y0, b.x1, b.y1, b.area) for b in largest.boxes] == [(30, 20, 36, 30, 60)]
    assert largest.boxes[0].activation_share == pytest.approx(60 / total)
    assert largest.mask.sum() == 60

    every = highest_activation_regions(cam, all_components=True)
    assert [(b.x0, b.y0, b.x1, b.y1, b.area) for b in every.boxes] == [
        (30, 20, 36, 30, 60),
        (0, 0, 5, 4, 20),
    ]
    assert every.boxes[1].peak == pytest.approx(0.5)
    assert every.boxes[1].activation_share == pytest.approx(10 / total)
    assert every.mask.sum() == 80

    # 20 px is 1 % of the 2000 px map, 60 px is 3 %.
    big_only = highest_activation_regions(cam, all_components=True, min_area=0.02)
    assert [b.area for b in big_only.boxes] == [60]
    assert highest_activation_regions(cam, all_components=True, min_area=0.5).boxes == []


def test_diagonal_neighbours_are_one_component() -> None:
    cam = blank(6, 6)
    cam[1, 1] = cam[2, 2] = cam[3, 3] = 1.0  # touching only at corners
    cam[3, 5] = 1.0  # two columns away: separate
    har = highest_activation_regions(cam, all_components=True)
    assert [(b.x0, b.y0, b.x1, b.y1, b.area) for b in har.boxes] == [
        (1, 1, 4, 4, 3),
        (5, 3, 6, 4, 1),
    ]


def test_all_zero_map_has_no_region() -> None:
    har = highest_activation_regions(blank(), all_components=True)
    assert har.boxes == []
    assert not har.mask.any()
    assert har.mask.shape == (40, 50)


def test_threshold_is_strict_and_relative_to_the_maximum() -> None:
    cam = blank(5, 5)
    cam[0, 0] = 0.5  # the maximum
    cam[4, 4] = 0.1  # exactly 0.2 × max: not above it
    cam[2, 4] = 0.1001  # just above
    har = highest_activation_regions(cam, threshold=0.2, all_components=True)
    assert [(b.x0, b.y0) for b in har.boxes] == [(0, 0), (4, 2)]  # equal areas: more activation
    assert [b.area for b in har.boxes] == [1, 1]
    assert not har.mask[4, 4]

    high = highest_activation_regions(cam, threshold=0.99, all_components=True)
    assert [(b.x0, b.y0) for b in high.boxes] == [(0, 0)]


def test_a_ramp_is_cut_where_the_threshold_says() -> None:
    cam = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (3, 1))  # columns 0.0 … 1.0
    box = highest_activation_regions(cam, threshold=0.45).boxes[0]
    assert (box.x0, box.x1, box.y0, box.y1) == (5, 11, 0, 3)
    assert box.peak == pytest.approx(1.0)
    assert box.activation_share == pytest.approx(cam[:, 5:].sum() / cam.sum())


def test_ties_in_area_go_to_the_stronger_component() -> None:
    cam = blank(4, 9)
    cam[0:2, 0:2] = 0.6
    cam[0:2, 6:8] = 1.0
    box = highest_activation_regions(cam).boxes[0]
    assert (box.x0, box.area) == (6, 4)


@pytest.mark.parametrize(
    ("cam", "kwargs", "field"),
    [
        (np.zeros((2, 2, 2)), {}, "cam"),
        (np.zeros((0, 3)), {}, "cam"),
        (np.array([[0.0, np.nan]]), {}, "cam"),
        (np.array([[0.0, -1.0]]), {}, "cam"),
        (np.ones((2, 2)), {"threshold": 0.0}, "har_threshold"),
        (np.ones((2, 2)), {"threshold": 1.0}, "har_threshold"),
        (np.ones((2, 2)), {"min_area": 1.5}, "har_min_area"),
    ],
)
def test_bad_input_names_its_field(cam: np.ndarray, kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InputError) as info:
        highest_activation_regions(cam, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
