from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main
from core.checkpoint import save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.models import build_model
from core.preprocessing import Preprocessing
from core.results import ImageCam

CLASSES = ["airplane", "baseballdiamond", "harbor", "storagetanks"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES))
    meta = CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def inputs(ucm_tif_dir: Path, ucm_dir: Path) -> list[Path]:
    return [
        ucm_tif_dir / "harbor00.tif",
        ucm_tif_dir / "airplane00.tif",
        ucm_dir / "harbor" / "harbor01.jpg",
    ]


def run(*args: str | Path) -> int:
    try:
        main(["cam", *map(str, args)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_writes_overlays_maps_and_json(
    checkpoint: Path, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = run("--model", checkpoint, *inputs, "--out", out, "--top-k", "2", "--batch-size", "2")
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for path, line in zip(inputs, lines, strict=True):
        assert line.startswith(f"{path}: ")
        result = ImageCam.model_validate_json((out / f"{path.stem}.json").read_text())
        with Image.open(path) as img:
            assert (result.width, result.height) == img.size
        assert result.image == path.name
        assert result.prediction.label in CLASSES
        assert result.prediction == result.top_k[0]
        assert len(result.cams) == 2
        for item in result.cams:
            assert set(item.artifacts) == {"overlay", "map_npy", "map_png16", "mask"}
            assert all((out / name).is_file() for name in item.artifacts.values())
            assert np.load(out / item.artifacts["map_npy"]).shape == (2, 2)
            assert len(item.boxes) == 1
            box = item.boxes[0]
            assert 0 <= box.x0 < box.x1 <= result.width
            assert 0 <= box.y0 < box.y1 <= result.height
            assert item.artifacts["overlay"] in line


def test_named_classes_gradcam_and_all_components(
    checkpoint: Path, inputs: list[Path], tmp_path: Path
) -> None:
    args = ["--class", "storagetanks", "--class", "harbor", "--method", "gradcam"]
    code = run("--model", checkpoint, inputs[0], "--out", tmp_path, *args, "--all-components")
    assert code == 0
    result = ImageCam.model_validate_json((tmp_path / "harbor00.json").read_text())
    assert [c.target.label for c in result.cams] == ["storagetanks", "harbor"]
    assert {c.method for c in result.cams} == {"gradcam"}
    assert (tmp_path / "harbor00_storagetanks_overlay.png").is_file()


def test_same_file_names_do_not_overwrite(
    checkpoint: Path, inputs: list[Path], tmp_path: Path
) -> None:
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(inputs[0], other / "harbor00.tif")
    shutil.copy(inputs[2], other / "harbor00.jpg")
    out = tmp_path / "out"
    assert run("--model", checkpoint, inputs[0], other / "harbor00.tif", other / "harbor00.jpg",
               "--out", out) == 0  # fmt: skip
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["harbor00-2.json", "harbor00-3.json", "harbor00.json"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("content", [b"this is not an image", b"truncated"])
def test_corrupt_image_is_one_line_and_exit_2(
    checkpoint: Path,
    inputs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
) -> None:
    bad = tmp_path / "broken.jpg"
    if content == b"truncated":
        content = (inputs[2]).read_bytes()[:2000]
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert run("--model", checkpoint, inputs[0], bad, "--out", out) == 2
    line = one_error_line(capsys)
    assert line.startswith("error (image): ")
    assert "broken.jpg" in line
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_unknown_class_is_one_line_and_exit_2(
    checkpoint: Path, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run("--model", checkpoint, inputs[0], "--out", tmp_path, "--class", "volcano")
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("error (classes): ")
    assert "volcano" in line


def test_not_a_checkpoint_is_one_line_and_exit_2(
    inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("--model", inputs[1], inputs[0], "--out", tmp_path) == 2
    assert one_error_line(capsys).startswith("error (checkpoint): ")


def test_conflicting_options_are_a_usage_error(
    checkpoint: Path, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run("--model", checkpoint, inputs[0], "--out", tmp_path, "--class", "harbor",
               "--top-k", "3")  # fmt: skip
    assert code == 2
    assert "either classes or top_k" in capsys.readouterr().err
    assert run("--model", checkpoint, inputs[0], "--out", tmp_path, "--alpha", "2") == 2
    assert "alpha" in capsys.readouterr().err
