"""``bench/reproduce.py --quick`` end to end on real images: a tiny random ResNet-18 (64 px)
stands in for the trained network, so the test checks the pipeline and the report, not the
paper's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bench import recipe
from bench.reproduce import main
from bench.reproduce_report import REPORT_FILE
from bench.reproduce_stages import MAX_PNG_BYTES
from core.checkpoint import save_checkpoint
from core.checkpoint_meta import CheckpointMeta, LineageStep
from core.datasets import ClassMapping
from core.models import build_model
from core.preprocessing import Preprocessing

UCM_PER_CLASS = 5  # the recipe's split keeps one validation and one test image per class
AID_PER_CLASS = 2  # fine-tuning holds one image per class out
#: The AID classes of the paper's Figure 3 and two more; Bridge is the unseen one.
AID_CLASSES = ("Port", "River", "Airport", "StorageTanks", "Bridge")


@pytest.fixture(scope="module")
def data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout of ../shared/data with a few real images per class."""
    root = tmp_path_factory.mktemp("data")
    mapping = shared_data / "ucm_aid_classes.json"
    (root / mapping.name).symlink_to(mapping)
    table = ClassMapping.load(mapping)
    for folder, classes, count in (
        ("ucm", list(table.ucm_to_aid), UCM_PER_CLASS),
        ("aid-mini", AID_CLASSES, AID_PER_CLASS),
    ):
        for name in classes:
            (root / folder / name).mkdir(parents=True)
            for image in sorted((shared_data / folder / name).glob("*.jpg"))[:count]:
                (root / folder / name / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="module")
def checkpoint(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights with a recorded training split, as a trained checkpoint has: 70/10/20,
    so that the validation split's path is covered too."""
    classes = recipe.shared_classes(data / "ucm_aid_classes.json")
    config = recipe.train_config(input_size=64, val_fraction=0.1, seed=1)
    meta = CheckpointMeta(
        arch="resnet18",
        classes=classes,
        preprocessing=Preprocessing(input_size=64),
        lineage=[LineageStep(op="train", params={"config": config.model_dump(mode="json")})],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model("resnet18", len(classes)), meta)
    return path


def arguments(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--quick", "--data", str(data), "--out", str(out / "raw"),
        "--report-dir", str(out / "report"), "--results", str(out / "results.json"),
        "--threads", str(torch.get_num_threads()), *extra,
    ]  # fmt: skip


def test_quick_run_writes_the_report_json_and_figures_and_resumes(
    data: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two locations and one retraining image per class keep the test fast on 2 busy cores.
    args = arguments(
        data, tmp_path, "--checkpoint", str(checkpoint), "--locations", "D1,D4",
        "--retrain-limit", "14",
    )  # fmt: skip
    main(args)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["paper"]["table1"]["UCM"] == {"training": 0.942, "validation": 0.917}
    assert results["model"]["split"] == {"seed": 1, "train": 42, "val": 14, "test": 14}
    # Only held-out images are scored: the 14 test images, one per class.
    assert results["accuracy"]["test"]["images"] == 14
    assert results["accuracy"]["val"]["images"] == 14
    assert set(results["accuracy"]["test"]["per_class_count"].values()) == {1}
    sweep = results["sweep"]
    assert sweep["images"] == 14
    assert sweep["retrain_images"] == 14
    cells = {(r["location"], r["fraction"]) for r in sweep["summary"]}
    assert cells == {(d, f) for d in ("D1", "D4") for f in (0.25, 0.5, 0.75)}
    retrained = [r for r in sweep["summary"] if r.get("retrained_accuracy_mean") is not None]
    assert sorted(r["location"] for r in retrained) == ["D1", "D4"]
    assert {r["fraction"] for r in retrained} == {0.5}
    transfer = results["transfer"]
    assert transfer["before"]["images"] == 4 * AID_PER_CLASS  # the shared classes only
    assert set(transfer["before"]["unseen"]) == {"Bridge"}
    assert transfer["fine_tune"]["split"]["test"] == len(AID_CLASSES)  # one per class

    report_dir = tmp_path / "report"
    report = (report_dir / REPORT_FILE).read_text()
    for heading in (
        "## Set-up, and what differs from the paper",
        "## 1. Trained accuracy (Table 1)",
        "## 2. Weight damage at D1–D4 (§4.2, Figure 5)",
        "| damage | D1 | D4 |",
        "### Masked retraining at 50 %",
        "### The paper's claims, here",
        "## 3. Transfer to AID without retraining (§4.1, Figure 3)",
        "## Notes",
    ):
        assert heading in report
    assert "| training accuracy | 94.2 % |" in report
    assert "quick smoke run" in report
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert sorted(linked) == ["accuracy.png", "drift.png", "figure3.png", "figure5_D4.png"]
    for name in linked:
        assert 0 < (report_dir / name).stat().st_size <= MAX_PNG_BYTES

    capsys.readouterr()
    main(args)
    log = capsys.readouterr().out
    for location in ("D1", "D4"):
        assert f"{location}: cached" in log
    assert "accuracy.json: cached" in log
    assert "stage.json: cached" in log
    assert json.loads((tmp_path / "results.json").read_text())["sweep"] == sweep


def test_without_a_checkpoint_the_recipe_trains_one(data: Path, tmp_path: Path) -> None:
    args = arguments(data, tmp_path, "--stages", "accuracy", "--input-size", "32")
    results = main(args)

    model = results["model"]
    assert model["trained_by_this_run"]
    assert model["input_size"] == 32
    assert model["train_config"]["epochs"] == 1  # --quick
    assert model["split"]["test"] == 14
    assert (tmp_path / "raw" / "model.safetensors").exists()
    report = (tmp_path / "report" / REPORT_FILE).read_text()
    assert report.count("_Stage not run._") == 2  # damage sweep and transfer


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--stages", "accuracy,damage"), "--stages: unknown damage"),
        (("--retrain-at", "0.4"), "--retrain-at 0.4 is not among --fractions"),
        (("--checkpoint", "missing.safetensors"), "--checkpoint: no such file"),
    ],
)
def test_bad_arguments_are_refused_naming_the_option(
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(SystemExit):
        main(arguments(data, tmp_path, *extra))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
