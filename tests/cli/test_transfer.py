"""``camres transfer`` end to end on aid-mini with a tiny UC Merced-class checkpoint (ResNet-18
at 64 px, random weights: the point is the plumbing, not the accuracy)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from core.checkpoint import load_checkpoint, save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.datasets import ClassMapping
from core.models import build_model
from core.preprocessing import Preprocessing
from core.transfer_figure import CAPTION_PX, GRID_FILE, HEADER_PX, PANEL_PX, REPORT_FILE
from core.transfer_spec import TransferSummary


def run(*args: str | Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``camres transfer ARGS`` (through ``cli.main``, so
    errors are reported as users see them)."""
    from cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main.main(["transfer", *(str(arg) for arg in args)])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ucm_checkpoint(class_mapping_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    mapping = ClassMapping.load(class_mapping_file)
    classes = sorted([*mapping.ucm_to_aid, *mapping.unseen_ucm])
    path = tmp_path_factory.mktemp("ckpt") / "ucm.safetensors"
    meta = CheckpointMeta(
        arch="resnet18", classes=classes, preprocessing=Preprocessing(input_size=64)
    )
    save_checkpoint(path, build_model("resnet18", len(classes)), meta)
    return path


def test_transfer_writes_the_grid_and_the_report(
    ucm_checkpoint: Path, aid_dir: Path, class_mapping_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    code, stdout, stderr = run(
        "--model", ucm_checkpoint, "--target", aid_dir, "--mapping", class_mapping_file,
        "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    assert "trained on UC Merced (15 classes), tested on AID" in stdout
    assert "/112 images" in stdout
    assert "Bridge" in stdout
    summary = TransferSummary.model_validate_json((out / REPORT_FILE).read_text())
    assert (summary.source_dataset, summary.target_dataset) == ("ucm", "aid")
    assert summary.before.images == 112
    assert summary.unseen_classes == ["Bridge"]
    assert len(summary.samples) == 15
    with Image.open(out / GRID_FILE) as grid:
        assert grid.size == (CAPTION_PX + 3 * PANEL_PX, HEADER_PX + 15 * PANEL_PX)
    overlay = summary.samples[0].before.cams[0].artifacts["overlay"]
    assert (out / overlay).is_file()


def test_fine_tuning_from_the_command_line(
    ucm_checkpoint: Path, aid_dir: Path, class_mapping_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "aid"
    for name in ("Beach", "Bridge", "Forest", "Port"):
        (target / name).mkdir(parents=True)
        for image in sorted((aid_dir / name).glob("*.jpg")):
            (target / name / image.name).symlink_to(image)
    saved = tmp_path / "tuned.safetensors"
    code, stdout, stderr = run(
        "--model", ucm_checkpoint, "--target", target, "--mapping", class_mapping_file,
        "--fine-tune-epochs", "1", "--batch-size", "8", "--val-fraction", "0",
        "--test-fraction", "0.25", "--save-model", saved, "--device", "cpu",
        "--out", tmp_path / "report", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    tuned = report["fine_tune"]
    assert tuned["split"] == {"train": 24, "val": 0, "test": 8}
    assert tuned["before"]["images"] == tuned["after"]["images"] == 6  # 2 per shared class
    assert [s["target_class"] for s in report["samples"]] == ["Beach", "Forest", "Port", "Bridge"]
    assert all(sample["after"] is not None for sample in report["samples"])
    ckpt = load_checkpoint(saved)
    assert ckpt.meta.classes == ["Beach", "Bridge", "Forest", "Port"]
    assert ckpt.meta.lineage[-1].parent_digest == load_checkpoint(ucm_checkpoint).digest


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save-model", "x.safetensors"], "--save-model needs --fine-tune-epochs"),
        (["--fine-tune-epochs", "1", "--test-fraction", "1.5"], "--test-fraction"),
        (["--threshold", "2"], "--threshold"),
    ],
)
def test_bad_options_are_usage_errors(
    ucm_checkpoint: Path,
    aid_dir: Path,
    class_mapping_file: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    code, _, stderr = run(
        "--model", ucm_checkpoint, "--target", aid_dir, "--mapping", class_mapping_file,
        "--out", tmp_path, *extra,
    )  # fmt: skip
    assert code == 2
    assert message in stderr


def test_a_target_of_the_same_dataset_is_refused(
    ucm_checkpoint: Path, ucm_dir: Path, class_mapping_file: Path, tmp_path: Path
) -> None:
    code, _, stderr = run(
        "--model", ucm_checkpoint, "--target", ucm_dir, "--mapping", class_mapping_file,
        "--out", tmp_path,
    )  # fmt: skip
    assert code == 2
    assert stderr.startswith("error (target_root):")
    assert not any(tmp_path.iterdir())
