"""``camres train | damage | retrain | evaluate`` end to end on a few real images (ResNet-18 at
32 px, one or two epochs: the point is the plumbing, not the accuracy)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.main import main
from core.checkpoint import load_checkpoint, load_model
from core.datasets import ClassMapping

CLASSES = ["agricultural", "beach", "forest"]


def run(*args: str | Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``camres ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def run_json(*args: str | Path) -> Any:
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def dataset(ucm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ucm-cli")
    for name in CLASSES:
        (root / name).mkdir()
        for image in sorted((ucm_dir / name).glob("*.jpg"))[:6]:
            (root / name / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    report = run_json(
        "train", dataset, "--arch", "resnet18", "--epochs", "2", "--batch-size", "6",
        "--input-size", "32", "--test-fraction", "0.2", "--device", "cpu", "--out", path,
    )  # fmt: skip
    return path, report


def test_train_writes_a_loadable_checkpoint(trained: tuple[Path, Any]) -> None:
    path, report = trained
    model, ckpt = load_model(path)
    assert report["digest"] == ckpt.digest
    assert ckpt.meta.classes == CLASSES
    assert ckpt.meta.preprocessing.input_size == 32
    assert [step.op for step in ckpt.meta.lineage] == ["train"]
    assert len(report["result"]["history"]) == 2
    assert report["evaluation"]["count"] == 3
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_evaluate_on_the_test_split_reproduces_training(
    trained: tuple[Path, Any], dataset: Path
) -> None:
    path, report = trained
    result = run_json("evaluate", path, dataset, "--split", "test", "--device", "cpu")
    assert result["count"] == report["evaluation"]["count"]
    assert result["confusion_matrix"] == report["evaluation"]["confusion_matrix"]
    assert result["accuracy"] == report["evaluation"]["accuracy"]


def test_evaluate_prints_accuracy_classes_and_confusion(
    trained: tuple[Path, Any], dataset: Path
) -> None:
    code, out, _ = run("evaluate", trained[0], dataset, "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("accuracy ")
    assert lines[0].endswith("on 18 images")
    for name in CLASSES:
        assert any(line.startswith(f"{name} ") and "6" in line for line in lines)
    matrix = lines[-3:]
    assert [row.split()[0] for row in matrix] == CLASSES
    assert sum(int(n) for row in matrix for n in row.split()[1:]) == 18


def test_evaluate_across_datasets_with_the_mapping(
    trained: tuple[Path, Any], aid_dir: Path, class_mapping_file: Path
) -> None:
    result = run_json(
        "evaluate", trained[0], aid_dir, "--mapping", class_mapping_file, "--device", "cpu"
    )
    # AID's Farmland, Beach and Forest are the model's three classes; the rest is unseen.
    assert result["per_class_count"] == {"agricultural": 8, "beach": 8, "forest": 8}
    assert result["count"] == 24


def test_damage_then_masked_retraining(
    trained: tuple[Path, Any], dataset: Path, tmp_path: Path
) -> None:
    damaged, retrained = tmp_path / "damaged.safetensors", tmp_path / "retrained.safetensors"
    code, out, err = run(
        "damage", trained[0], "--target", "D1", "--target", "D4", "--fraction", "0.5",
        "--seed", "3", "--out", damaged,
    )  # fmt: skip
    assert code == 0, err
    assert "damaged 1806336 of 3612672 weights in 4 layers" in out

    report = run_json(
        "retrain", damaged, dataset, "--epochs", "1", "--batch-size", "6", "--device", "cpu",
        "--out", retrained,
    )  # fmt: skip
    assert report["damage_check"]["ok"]
    assert report["damage_check"]["damaged"] == 1806336
    assert report["before"]["count"] == report["after"]["count"] == 3  # the held-out test split

    ckpt = load_checkpoint(retrained)
    assert [step.op for step in ckpt.meta.lineage] == ["train", "damage", "retrain"]
    assert ckpt.meta.lineage[-1].parent_digest == load_checkpoint(damaged).digest
    assert len(ckpt.damage_masks) == 4
    for name, mask in ckpt.damage_masks.items():
        assert torch.count_nonzero(ckpt.state_dict[name][mask]) == 0
        assert torch.count_nonzero(ckpt.state_dict[name][~mask]) > 0


def test_classes_from_the_mapping_follow_ucm_order(
    aid_dir: Path, class_mapping_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "aid.safetensors"
    code, _, err = run(
        "train", aid_dir, "--classes-from", class_mapping_file, "--epochs", "1",
        "--input-size", "32", "--val-fraction", "0", "--test-fraction", "0", "--device", "cpu",
        "--out", path,
    )  # fmt: skip
    assert code == 0, err
    mapping = ClassMapping.load(class_mapping_file)
    expected = [mapping.ucm_to_aid[name] for name in sorted(mapping.ucm_to_aid)]
    assert load_checkpoint(path).meta.classes == expected


def test_errors_name_the_option_or_field(
    trained: tuple[Path, Any], dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.safetensors"
    code, _, err = run("train", dataset, "--lr", "-1", "--out", out)
    assert code == 2
    assert "--lr" in err

    code, _, err = run("train", dataset, "--classes", "forest,nowhere", "--out", out)
    assert code == 2
    assert "error (classes)" in err
    assert "nowhere" in err

    code, _, err = run("train", dataset, "--init", "missing.safetensors", "--out", out)
    assert code == 2
    assert "--init" in err

    code, _, err = run("retrain", trained[0], dataset, "--out", out)
    assert code == 2
    assert "error (checkpoint)" in err
    assert "no damage masks" in err
    assert not out.exists()
