"""The Figure 2 pipeline on a tiny resnet18 and real UC Merced images: every condition is
computed, the caller's model is left untouched, and retraining keeps the damage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.cam_options import CamOptions
from core.checkpoint import load_checkpoint, save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.damage import damage_checkpoint, damaged_count
from core.damage_spec import DamageSpec
from core.exceptions import CheckpointError, InputError
from core.images import decode_image
from core.models import build_model
from core.preprocessing import Preprocessing
from core.resilience import RetrainPlan, explain_conditions, retrain_checkpoint
from core.train_spec import TrainConfig

CLASSES = ["agricultural", "beach", "forest"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, CheckpointMeta, Path]:
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    meta = CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return model, load_checkpoint(path).meta, path


@pytest.fixture(scope="module")
def dataset(ucm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real images per class, as a class-folder dataset."""
    root = tmp_path_factory.mktemp("ucm-small")
    for name in CLASSES:
        (root / name).mkdir()
        for src in sorted((ucm_dir / name).glob("*.jpg"))[:6]:
            (root / name / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="module")
def images(ucm_dir: Path) -> list[tuple[str, object]]:
    paths = [ucm_dir / "beach" / "beach00.jpg", ucm_dir / "forest" / "forest01.jpg"]
    return [(p.name, decode_image(p)) for p in paths]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _quick() -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=8, lr=0.01, val_fraction=0.2, test_fraction=0.0)


def test_damage_condition_changes_maps_and_restores_model(tiny, images) -> None:
    model, meta, _ = tiny
    before = _state(model)
    spec = DamageSpec(targets=["D4"], fraction=0.9, seed=3)

    out = explain_conditions(model, meta, images, CamOptions(), damage=spec)

    assert set(out.explanations) == {"intact", "damaged"}
    assert all(len(v) == len(images) for v in out.explanations.values())
    intact, hurt = out.explanations["intact"][0], out.explanations["damaged"][0]
    assert intact.result.image == hurt.result.image == "beach00.jpg"
    assert not torch.allclose(
        torch.from_numpy(intact.raw_maps[0]), torch.from_numpy(hurt.raw_maps[0])
    )
    conv = model.get_submodule("layer4.0.conv1").weight
    assert out.damage is not None
    assert out.damage["layers"]["layer4.0.conv1.weight"]["damaged"] == damaged_count(
        conv.numel(), 0.9
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "caller's model was modified"


def test_retrained_condition_keeps_damage_and_leaves_caller_model(tiny, images, dataset) -> None:
    model, meta, _ = tiny
    before = _state(model)
    seen: list[float] = []

    out = explain_conditions(
        model, meta, images, CamOptions(),
        damage=DamageSpec(targets=["D1", "D4"], fraction=0.5),
        retrain_plan=RetrainPlan(dataset, _quick()),
        progress=lambda p: seen.append(p.fraction),
    )  # fmt: skip

    assert set(out.explanations) == {"intact", "damaged", "retrained"}
    assert out.retrain is not None
    assert out.retrain["damage_check"]["ok"] is True
    assert out.retrain["damage_check"]["damaged"] == out.damage["damaged"] > 0
    assert seen == sorted(seen)
    assert seen[0] >= 0.0
    assert seen[-1] <= 1.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "caller's model was modified"


def test_retraining_without_damage_is_refused(tiny, images, dataset) -> None:
    model, meta, _ = tiny
    with pytest.raises(InputError) as info:
        explain_conditions(
            model, meta, images, CamOptions(), retrain_plan=RetrainPlan(dataset, _quick())
        )
    assert info.value.field == "retrain"


def test_retrain_checkpoint_writes_lineage_and_keeps_faults(tiny, dataset, tmp_path: Path) -> None:
    _, _, path = tiny
    damaged_path = tmp_path / "damaged.safetensors"
    damage_checkpoint(path, DamageSpec(targets=["D2"], fraction=0.5), damaged_path)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, val_fraction=0.2, test_fraction=0.2)

    outcome = retrain_checkpoint(damaged_path, dataset, config, tmp_path / "retrained.safetensors")

    assert outcome.damage_check["ok"] is True
    assert outcome.before is not None
    assert outcome.after is not None
    retrained = load_checkpoint(tmp_path / "retrained.safetensors")
    assert retrained.digest == outcome.digest
    assert [s.op for s in retrained.meta.lineage][-2:] == ["damage", "retrain"]
    for name, mask in retrained.damage_masks.items():
        assert torch.count_nonzero(retrained.state_dict[name][mask]) == 0, name


def test_retrain_checkpoint_refuses_an_undamaged_model(tiny, dataset, tmp_path: Path) -> None:
    _, _, path = tiny
    with pytest.raises(CheckpointError, match="no damage masks"):
        retrain_checkpoint(path, dataset, _quick(), tmp_path / "out.safetensors")
