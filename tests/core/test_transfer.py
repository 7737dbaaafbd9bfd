"""Cross-dataset transfer on real UC Merced / AID images with tiny ResNet-18s at 64 px: the
mapping's direction, which images count towards accuracy, the fine-tuning path and the report.
Accuracy values are not the point; the bookkeeping is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.cam_options import CamOptions
from core.checkpoint import load_model, save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.datasets import ClassMapping
from core.evaluation import evaluate_folder, folder_samples
from core.exceptions import CancelledError, DatasetError, InputError
from core.models import build_model
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.train_spec import CheckpointInit, TrainConfig
from core.transfer import TransferResult, _transfer_head, transfer
from core.transfer_figure import (
    CAPTION_PX,
    GRID_FILE,
    HEADER_PX,
    PANEL_PX,
    REPORT_FILE,
    grid_size,
    write_transfer_report,
)
from core.transfer_spec import TransferSummary, overall_accuracy, plan_transfer, tally

SIZE = 64
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def mapping(class_mapping_file: Path) -> ClassMapping:
    return ClassMapping.load(class_mapping_file)


def ucm_classes(mapping: ClassMapping) -> list[str]:
    """A UC Merced model's classes: the 14 shared ones, intersection and one more UCM-only."""
    return sorted([*mapping.ucm_to_aid, *mapping.unseen_ucm, "chaparral"])


def always(model: nn.Module, classes: list[str], name: str) -> nn.Module:
    """Make ``model`` predict ``name`` for every image, provably: the other rows of the head
    are zero, and ``name``'s row is non-negative over post-ReLU (non-negative) pooled features,
    so its logit is at least its bias of 10 while every other logit is 0. Its CAM is a real,
    non-constant map."""
    fc = model.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    index = classes.index(name)
    with torch.no_grad():
        row = fc.weight[index].abs().clone()
        fc.weight.zero_()
        fc.weight[index] = row
        fc.bias.zero_()
        fc.bias[index] = 10.0
    return model.eval()


def tiny(classes: list[str], *, seed: int = 0) -> tuple[nn.Module, CheckpointMeta]:
    torch.manual_seed(seed)
    model = build_model("resnet18", len(classes)).eval()
    meta = CheckpointMeta(
        arch="resnet18", classes=classes, preprocessing=Preprocessing(input_size=SIZE)
    )
    return model, meta


def subset(root: Path, source: Path, classes: list[str], per_class: int) -> Path:
    """A dataset folder of symlinks to the first ``per_class`` images of ``classes``."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for image in sorted((source / name).glob("*.jpg"))[:per_class]:
            (root / name / image.name).symlink_to(image)
    return root


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the plan


def test_a_ucm_model_reads_the_mapping_ucm_to_aid(mapping: ClassMapping) -> None:
    aid = sorted([*mapping.aid_to_ucm, *mapping.unseen_aid])
    plan = plan_transfer(ucm_classes(mapping), aid, mapping)
    assert (plan.source, plan.target) == ("ucm", "aid")
    assert plan.shared == {name: mapping.to_ucm(name) for name in sorted(mapping.aid_to_ucm)}
    assert plan.shared["Port"] == "harbor"
    assert plan.unseen == ["Bridge"]
    assert plan.source_only == ["chaparral", "intersection"]


def test_an_aid_model_reads_the_mapping_aid_to_ucm(mapping: ClassMapping) -> None:
    model = sorted([*mapping.aid_to_ucm, *mapping.unseen_aid])
    plan = plan_transfer(model, ["beach", "chaparral", "harbor", "intersection"], mapping)
    assert (plan.source, plan.target) == ("aid", "ucm")
    assert plan.shared == {"beach": "Beach", "harbor": "Port"}
    assert plan.unseen == ["chaparral", "intersection"]
    assert "Bridge" in plan.source_only
    assert "Port" not in plan.source_only


def test_a_mapped_class_the_model_lacks_is_unseen(mapping: ClassMapping) -> None:
    plan = plan_transfer(["beach", "forest"], ["Beach", "Forest", "Port"], mapping)
    assert plan.shared == {"Beach": "beach", "Forest": "forest"}
    assert plan.unseen == ["Port"]


@pytest.mark.parametrize(
    ("model_classes", "target_classes", "field"),
    [
        (["beach", "Forest"], ["Beach", "forest"], "mapping"),  # both namings: ambiguous
        (["cat", "dog"], ["Beach", "Forest"], "mapping"),  # not in the mapping at all
        (["beach", "forest"], ["beach", "forest"], "target_root"),  # UCM model on UCM names
    ],
)
def test_plans_that_cannot_work_name_the_culprit(
    mapping: ClassMapping, model_classes: list[str], target_classes: list[str], field: str
) -> None:
    with pytest.raises(DatasetError) as caught:
        plan_transfer(model_classes, target_classes, mapping)
    assert caught.value.field == field


def test_tally_counts_only_shared_classes() -> None:
    truth = ["Port", "Port", "Beach", "Bridge", "Bridge"]
    predicted = ["harbor", "beach", "beach", "harbor", "river"]
    counts = tally(truth, predicted, {"Port": "harbor", "Beach": "beach"}, {"Port", "Beach"})
    assert (counts.images, counts.correct, counts.accuracy) == (3, 2, 2 / 3)
    assert counts.per_class["Port"].accuracy == 0.5
    assert counts.per_class["Port"].predicted == {"harbor": 1, "beach": 1}
    bridge = counts.unseen["Bridge"]
    assert (bridge.images, bridge.correct, bridge.accuracy) == (2, None, None)
    assert overall_accuracy(counts) == 2 / 3  # Bridge has no answer: not counted either


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def ucm_on_aid(mapping: ClassMapping, aid_dir: Path) -> Iterator[tuple[TransferResult, dict]]:
    """A UC Merced model that always says "harbor", tested on all of aid-mini."""
    classes = ucm_classes(mapping)
    model, meta = tiny(classes)
    always(model, classes, "harbor")
    before = state_of(model)
    result = transfer(model, meta, aid_dir, mapping, device="cpu")
    yield result, before
    after = state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_accuracy_counts_shared_images_only(ucm_on_aid: tuple[TransferResult, dict]) -> None:
    result, _ = ucm_on_aid
    # aid-mini: 8 images in each of 14 shared classes and in Bridge. Only Port → harbor is right.
    assert result.before.images == 14 * 8
    assert result.before.correct == 8
    assert result.before.accuracy == pytest.approx(1 / 14)
    assert result.before.per_class["Port"].accuracy == 1.0
    assert result.before.per_class["Airport"].expected == "airplane"
    assert result.before.per_class["Airport"].accuracy == 0.0
    assert result.before.per_class["Airport"].predicted == {"harbor": 8}
    assert set(result.before.per_class) == set(result.plan.shared)


def test_unseen_classes_are_reported_not_counted(ucm_on_aid: tuple[TransferResult, dict]) -> None:
    result, _ = ucm_on_aid
    bridge = result.before.unseen["Bridge"]
    assert (bridge.images, bridge.expected, bridge.correct, bridge.accuracy) == (
        8,
        None,
        None,
        None,
    )
    assert bridge.predicted == {"harbor": 8}
    assert "Bridge" not in result.before.per_class


def test_samples_cover_shared_then_unseen_classes(ucm_on_aid: tuple[TransferResult, dict]) -> None:
    result, _ = ucm_on_aid
    assert [s.target_class for s in result.samples] == [*result.plan.shared, "Bridge"]
    bridge = result.samples[-1]
    assert not bridge.shared
    assert bridge.expected is None
    assert bridge.before.result.prediction.label == "harbor"  # necessarily a source class
    assert bridge.after is None
    port = next(s for s in result.samples if s.target_class == "Port")
    summary = port.summary()
    assert summary.kind == "shared"
    assert summary.correct_before is True
    assert summary.before.cams[0].boxes  # a real map, summarized by its HAR box
    assert port.before.maps[0].shape == (port.image.height, port.image.width)


def test_the_report_has_the_figure_3_layout(
    ucm_on_aid: tuple[TransferResult, dict], tmp_path: Path
) -> None:
    result, _ = ucm_on_aid
    summary = write_transfer_report(result, tmp_path)
    width, height = grid_size(result)
    assert (width, height) == (CAPTION_PX + 3 * PANEL_PX, HEADER_PX + 15 * PANEL_PX)
    with Image.open(tmp_path / GRID_FILE) as grid:
        assert grid.size == (width, height)
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels[HEADER_PX:, CAPTION_PX:].std() > 10  # panels drawn, not a blank canvas
    written = TransferSummary.model_validate_json((tmp_path / REPORT_FILE).read_text())
    assert written == summary
    assert written.unseen_classes == ["Bridge"]
    assert written.fine_tune is None
    assert written.before.accuracy == pytest.approx(1 / 14)
    for sample in written.samples:
        for name in sample.before.cams[0].artifacts.values():
            assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / REPORT_FILE).read_text())["samples"][-1]["kind"] == "unseen"


def test_an_aid_model_on_ucm_images(mapping: ClassMapping, ucm_dir: Path, tmp_path: Path) -> None:
    classes = sorted([*mapping.aid_to_ucm, *mapping.unseen_aid])
    model, meta = tiny(classes)
    always(model, classes, "Port")
    root = subset(tmp_path, ucm_dir, ["beach", "chaparral", "harbor", "intersection", "river"], 2)
    result = transfer(model, meta, root, mapping, samples_per_class=2, device="cpu")
    assert (result.plan.source, result.plan.target) == ("aid", "ucm")
    assert (result.before.images, result.before.correct) == (6, 2)
    assert result.before.per_class["harbor"].accuracy == 1.0
    assert set(result.before.unseen) == {"chaparral", "intersection"}
    assert [s.target_class for s in result.samples] == [
        "beach", "beach", "harbor", "harbor", "river", "river",
        "chaparral", "chaparral", "intersection", "intersection",
    ]  # fmt: skip


# --------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def aid_small(aid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aid-small")
    return subset(root, aid_dir, ["Beach", "Bridge", "Forest", "Port"], 8)


@pytest.fixture(scope="module")
def fine_tuned(
    mapping: ClassMapping, aid_small: Path
) -> tuple[TransferResult, dict[str, torch.Tensor], list[Progress]]:
    classes = ucm_classes(mapping)
    model, meta = tiny(classes)
    before = state_of(model)
    reports: list[Progress] = []
    config = TrainConfig(
        epochs=1, batch_size=8, lr=0.01, val_fraction=0.0, test_fraction=0.25, device="cpu"
    )
    result = transfer(
        model, meta, aid_small, mapping, fine_tune=config, parent_digest=DIGEST,
        device="cpu", progress=reports.append,
    )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return result, before, reports


def test_fine_tuning_yields_after_cams_on_held_out_images(
    fine_tuned: tuple[TransferResult, dict, list[Progress]],
) -> None:
    result, _, _ = fine_tuned
    tuned = result.fine_tuned
    assert tuned is not None
    assert tuned.meta.classes == ["Beach", "Bridge", "Forest", "Port"]
    assert tuned.head_init == {"Beach": "beach", "Forest": "forest", "Port": "harbor"}
    assert tuned.split == {"train": 24, "val": 0, "test": 8}
    assert tuned.result.epochs_run == 1
    # Before and after are measured on the same held-out images; Bridge is unseen before, a
    # class of its own after, and in neither case part of the shared-class accuracy.
    assert tuned.before.images == tuned.after.images == 6
    assert tuned.before.unseen["Bridge"].correct is None
    assert tuned.after.unseen["Bridge"].expected == "Bridge"
    assert [s.target_class for s in result.samples] == ["Beach", "Forest", "Port", "Bridge"]
    for sample in result.samples:
        assert sample.after is not None
        assert sample.after.result.prediction.label in tuned.meta.classes
        assert sample.before.result.prediction.label in result.meta.classes
        assert sample.summary().correct_after is not None


def test_samples_are_drawn_from_the_held_out_split(
    fine_tuned: tuple[TransferResult, dict, list[Progress]], tmp_path: Path
) -> None:
    result, _, _ = fine_tuned
    tuned = result.fine_tuned
    assert tuned is not None
    path = tmp_path / "tuned.safetensors"
    save_checkpoint(path, tuned.model, tuned.meta)
    model, ckpt = load_model(path)
    assert ckpt.meta.lineage[-1].op == "train"
    assert ckpt.meta.lineage[-1].parent_digest == DIGEST
    # The lineage records the fine-tuning split: its test split is the very images the
    # transfer held out and drew its samples from, and evaluating on it gives the same result.
    held_out = {s.path for s in folder_samples(ckpt.meta, result.target_root, split="test")}
    assert {s.path for s in result.samples} <= held_out
    again = evaluate_folder(model, ckpt.meta, result.target_root, split="test", device="cpu")
    assert again.count == tuned.split["test"]
    assert again.accuracy == pytest.approx(overall_accuracy(tuned.after))
    assert ckpt.meta.provenance["test_accuracy"] == pytest.approx(again.accuracy)


def test_fine_tuned_report_adds_two_columns(
    fine_tuned: tuple[TransferResult, dict, list[Progress]], tmp_path: Path
) -> None:
    result, _, _ = fine_tuned
    summary = write_transfer_report(result, tmp_path, sample_artifacts=False)
    with Image.open(tmp_path / GRID_FILE) as grid:
        assert grid.size == (CAPTION_PX + 5 * PANEL_PX, HEADER_PX + 4 * PANEL_PX)
    assert summary.fine_tune is not None
    assert summary.fine_tune.head_init["Port"] == "harbor"
    assert all(s.after is not None for s in summary.samples)
    assert not (tmp_path / "cams").exists()


def test_progress_runs_through_every_stage(
    fine_tuned: tuple[TransferResult, dict, list[Progress]],
) -> None:
    _, _, reports = fine_tuned
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert {"evaluate", "train", "cam"} <= {p.stage for p in reports}


def test_the_new_head_scores_shared_classes_as_the_old_one(mapping: ClassMapping) -> None:
    classes = ucm_classes(mapping)
    model, meta = tiny(classes, seed=3)
    targets = ["Beach", "Bridge", "Port"]
    plan = plan_transfer(classes, targets, mapping)
    images = torch.rand(2, 3, SIZE, SIZE)
    old = model(images)
    tuned = build_model("resnet18", len(classes))
    tuned.load_state_dict(model.state_dict())
    assert _transfer_head(tuned.eval(), meta, targets, plan, seed=0) == {
        "Beach": "beach",
        "Port": "harbor",
    }
    new = tuned(images)
    assert new.shape == (2, 3)
    torch.testing.assert_close(new[:, 0], old[:, classes.index("beach")])
    torch.testing.assert_close(new[:, 2], old[:, classes.index("harbor")])


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"cam_options": CamOptions(classes=["beach"])}, "cam_options.classes"),
        ({"fine_tune": TrainConfig(init=CheckpointInit(checkpoint="x"))}, "fine_tune.init"),
        ({"fine_tune": TrainConfig(test_fraction=0.0)}, "fine_tune.test_fraction"),
        ({"parent_digest": "md5:123"}, "parent_digest"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    mapping: ClassMapping, aid_dir: Path, kwargs: dict, field: str
) -> None:
    model, meta = tiny(ucm_classes(mapping))
    with pytest.raises(InputError) as caught:
        transfer(model, meta, aid_dir, mapping, **kwargs)
    assert caught.value.field == field


def test_a_stop_request_cancels(mapping: ClassMapping, aid_small: Path) -> None:
    model, meta = tiny(ucm_classes(mapping))
    with pytest.raises(CancelledError):
        transfer(model, meta, aid_small, mapping, device="cpu", should_stop=lambda: True)
