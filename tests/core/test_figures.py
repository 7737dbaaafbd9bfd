from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from core.checkpoint_meta import CheckpointMeta
from core.damage_spec import DamageSpec
from core.exceptions import InputError
from core.figures import (
    ACCURACY_PX,
    DRIFT_PX,
    GRID_HEADER_PX,
    GRID_PANEL_PX,
    GridRow,
    figure5_grid,
    grid_columns,
    plot_accuracy,
    plot_drift,
    sample_panels,
)
from core.images import decode_image
from core.models import build_model
from core.preprocessing import Preprocessing
from core.sweep_report import summarize
from core.sweep_spec import CellMetrics, SweepConfig, SweepReport, SweepRow

CLASSES = ["airplane", "beach", "forest", "harbor"]


def report(*, retrained: bool, trials: int = 2) -> SweepReport:
    """A synthetic report: accuracy falls with damage, drift grows."""
    config = SweepConfig(locations=["D1", "D4"], fractions=[0.25, 0.5, 0.75], trials=trials)
    rows = []
    for location in config.locations:
        for fraction in config.fractions:
            for trial in range(trials):
                wobble = 0.02 * trial
                metrics = CellMetrics(
                    accuracy=0.9 - 0.6 * fraction + wobble,
                    flip_rate=0.5 * fraction,
                    cam_correlation=1 - fraction,
                    har_box_iou=1 - 0.8 * fraction + wobble,
                    mask_iou=None if fraction > 0.7 else 1 - fraction,
                    peak_shift_px=40 * fraction,
                )
                again = metrics.model_copy(update={"accuracy": 0.85}) if retrained else None
                rows.append(
                    SweepRow(
                        location=location,
                        fraction=fraction,
                        trial=trial,
                        seed=trial,
                        damaged_weights=10,
                        target_weights=100,
                        retrained=again if fraction == 0.5 else None,
                        **metrics.model_dump(),
                    )
                )
    return SweepReport(
        config=config,
        arch="resnet18",
        classes=CLASSES,
        images=12,
        intact_accuracy=0.92,
        strategy="fast",
        seconds=1.0,
        rows=rows,
        summary=summarize(rows),
    )


@pytest.mark.parametrize("retrained", [True, False])
@pytest.mark.parametrize("trials", [1, 3])
def test_sweep_plots_are_pngs_of_the_promised_size(
    tmp_path: Path, retrained: bool, trials: int
) -> None:
    data = report(retrained=retrained, trials=trials)
    accuracy = plot_accuracy(data, tmp_path / "plots" / "accuracy.png")
    drift = plot_drift(data, tmp_path / "plots" / "drift.png")
    for path, size in ((accuracy, ACCURACY_PX), (drift, DRIFT_PX)):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == size


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES)).eval()


@pytest.fixture(scope="module")
def meta() -> CheckpointMeta:
    return CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )


@pytest.fixture(scope="module")
def samples(ucm_dir: Path, ucm_tif_dir: Path) -> list[tuple[str, Image.Image, str | None]]:
    beach = ucm_dir / "beach" / "beach03.jpg"
    return [
        ("beach03.jpg", decode_image(beach), "beach"),
        ("airplane00.tif", decode_image(ucm_tif_dir / "airplane00.tif"), None),
        ("small.jpg", decode_image(beach).resize((90, 70)), "forest"),  # any size
    ]


def test_figure5_grid_has_eight_columns_with_retraining(
    model: nn.Module,
    meta: CheckpointMeta,
    samples: list[tuple[str, Image.Image, str | None]],
    tmp_path: Path,
) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrained = build_model("resnet18", len(CLASSES)).eval()
    spec = DamageSpec(targets=["D4"], fraction=0.5)
    rows = sample_panels(model, meta, samples, spec, retrained=retrained)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [row.name for row in rows] == [name for name, _, _ in samples]
    for row, (_, image, _) in zip(rows, samples, strict=True):
        for explanation in (row.intact, row.damaged, row.retrained):
            assert explanation is not None
            assert explanation.maps[0].shape == (image.height, image.width)
    assert len(grid_columns(rows)) == 8
    path = figure5_grid(rows, tmp_path / "figure5.png", title="D4 50%")
    with Image.open(path) as image:
        assert image.size == (8 * GRID_PANEL_PX, 3 * GRID_PANEL_PX + GRID_HEADER_PX)


def test_figure5_grid_without_retraining_has_six_columns(
    model: nn.Module,
    meta: CheckpointMeta,
    samples: list[tuple[str, Image.Image, str | None]],
    tmp_path: Path,
) -> None:
    rows = sample_panels(model, meta, samples[:1], DamageSpec(targets=["D1"], fraction=0.9))
    assert grid_columns(rows)[-1] == "label after damage"
    path = figure5_grid(rows, tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.size == (6 * GRID_PANEL_PX, GRID_PANEL_PX + GRID_HEADER_PX)


def test_a_label_is_wrong_against_the_truth_or_else_the_intact_prediction(
    model: nn.Module, meta: CheckpointMeta, samples: list[tuple[str, Image.Image, str | None]]
) -> None:
    (row,) = sample_panels(model, meta, samples[:1], DamageSpec(targets=["D4"], fraction=0.05))
    predicted = row.damaged.result.prediction.label
    assert GridRow(row.name, row.image, predicted, row.intact, row.damaged).damaged_wrong is False
    other = next(c for c in CLASSES if c != predicted)
    assert GridRow(row.name, row.image, other, row.intact, row.damaged).damaged_wrong is True
    unknown = GridRow(row.name, row.image, None, row.intact, row.damaged)
    intact_label = row.intact.result.prediction.label
    assert unknown.damaged_wrong is (predicted != intact_label)


def test_empty_grids_are_refused(model: nn.Module, meta: CheckpointMeta, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        figure5_grid([], tmp_path / "x.png")
    with pytest.raises(InputError):
        sample_panels(model, meta, [], DamageSpec(targets=["D4"], fraction=0.5))
