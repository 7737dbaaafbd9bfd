from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from cli.sweep import sweep
from core.checkpoint import save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.figures import ACCURACY_PX, DRIFT_PX, GRID_HEADER_PX, GRID_PANEL_PX
from core.models import build_model
from core.preprocessing import Preprocessing
from core.sweep_report import read_rows_jsonl
from core.sweep_spec import SweepReport

CLASSES = ["airplane", "beach", "forest", "harbor"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    meta = CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model("resnet18", len(CLASSES)), meta)
    return path


@pytest.fixture(scope="module")
def data(ucm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real images of each of the model's classes, plus a class the model does not know."""
    root = tmp_path_factory.mktemp("data")
    for name in [*CLASSES, "river"]:
        (root / name).mkdir()
        for source in sorted((ucm_dir / name).glob("*.jpg"))[:5]:
            (root / name / source.name).symlink_to(source)
    return root


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(sweep, [str(a) for a in args])


def test_sweep_writes_tables_plots_and_the_figure5_grid(
    checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    samples = [data / "beach" / "beach00.jpg", data / "airplane" / "airplane01.jpg"]
    result = run(
        "--model", checkpoint, "--data", data, "--limit", "6",
        "--locations", "D1,D4", "--fractions", "0.3,0.6", "--trials", "2",
        "--retrain-at", "0.6", "--retrain-epochs", "1", "--retrain-batch-size", "4",
        "--sample", samples[0], "--samples", samples[1], "--batch-size", "4",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "swept 8 damaged networks on 6 images" in result.output
    report = SweepReport.model_validate(json.loads((out / "sweep.json").read_text()))
    assert report.images == 6
    assert report.config.locations == ["D1", "D4"]
    with (out / "sweep_cells.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 2 * 2 * 2
    assert sum(bool(row["retrained_accuracy"]) for row in cells) == 2 * 2  # both trials at 0.6
    with (out / "sweep_summary.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2
    assert len(read_rows_jsonl(out / "sweep_cells.jsonl")) == 8
    expected = {
        "accuracy.png": ACCURACY_PX,
        "drift.png": DRIFT_PX,
        # D4 at the retraining level by default: eight columns, one row per sample.
        "figure5.png": (8 * GRID_PANEL_PX, 2 * GRID_PANEL_PX + GRID_HEADER_PX),
    }
    for name, size in expected.items():
        with Image.open(out / name) as image:
            assert image.size == size, name
        assert f"wrote {out / name}" in result.output


def test_defaults_are_the_paper_sweep(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    # Only checks the configuration: a single image and trial keep it short.
    result = run("--model", checkpoint, "--data", data, "--limit", "1", "--trials", "1",
                 "--locations", "D4", "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = SweepReport.model_validate_json((tmp_path / "sweep.json").read_text())
    assert report.config.fractions == [round(0.05 * i, 2) for i in range(1, 20)]
    assert report.config.fault.kind == "stuck_at"
    assert not (tmp_path / "figure5.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fractions", "0.5:0.1:0.1"], "--fractions"),
        (["--fractions", "0.2,0.4", "--retrain-at", "0.3"], "--retrain-at"),
        (["--locations", "D1", "--figure-location", "D3"], "--figure-location"),
        (["--threshold", "2"], "--threshold"),
        (["--fault", "gaussian", "--sigma", "-1"], "--sigma"),
        (["--split", "test"], "records no training split"),
    ],
)
def test_bad_options_are_usage_errors(
    checkpoint: Path, data: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("--model", checkpoint, "--data", data, "--out", tmp_path, *args)
    assert result.exit_code == 2
    assert message in result.output
