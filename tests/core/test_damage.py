"""Weight damage (paper §3.2): targets, exact and nested masks, injection and restore, and the
exact permanence of damage through optimizer steps (masked retraining, §4.2)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from core.checkpoint import load_checkpoint, load_model, save_checkpoint
from core.checkpoint_meta import CheckpointMeta, file_digest
from core.damage import (
    apply_damage,
    damage_checkpoint,
    damage_masks,
    damaged,
    damaged_count,
    fault_values,
    hold_damage,
    resolve_targets,
    retrain,
    verify_damage,
)
from core.damage_spec import BitFlip, DamageSpec, Gaussian, StuckAt
from core.datasets import ImageFolder
from core.exceptions import DamageSpecError
from core.models import build_model
from core.preprocessing import Preprocessing
from core.train_spec import TrainConfig
from core.training_data import DataSplits, load_splits

CLASSES = ["agricultural", "beach", "forest"]
CONV1 = [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=4)


class SmallResNet18(nn.Module):
    """torchvision's ResNet-18 (its BasicBlock ×[2, 2, 2, 2], same module names, downsample
    skips from layer2 on) at ``width`` channels instead of 64, so 50 training steps are cheap."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes = width
        for stage in range(1, 5):
            planes, stride = width * 2 ** (stage - 1), 1 if stage == 1 else 2
            downsample = None
            if stride != 1:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            blocks = [BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture
def small() -> nn.Module:
    torch.manual_seed(0)
    return SmallResNet18()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- targets


def test_default_targets_are_the_first_conv_of_every_block(model: nn.Module) -> None:
    assert resolve_targets(model, DamageSpec(fraction=0.5)) == CONV1


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["D4"], ["layer4.0.conv1", "layer4.1.conv1"]),
        (
            ["layer4.*.conv*"],
            ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"],
        ),
        (["fc", "D1"], ["layer1.0.conv1", "layer1.1.conv1", "fc"]),
        (["D2", "layer2.0.conv1"], ["layer2.0.conv1", "layer2.1.conv1"]),
        (["layer3.0.downsample.0"], ["layer3.0.downsample.0"]),
    ],
)
def test_targets_by_preset_name_and_glob(
    model: nn.Module, targets: list[str], expected: list[str]
) -> None:
    assert resolve_targets(model, DamageSpec(fraction=0.5, targets=targets)) == expected


def test_unknown_target_names_pattern_and_valid_names(model: nn.Module) -> None:
    with pytest.raises(DamageSpecError) as info:
        resolve_targets(model, DamageSpec(fraction=0.5, targets=["D1", "layer9.*.conv1"]))
    assert info.value.field == "targets"
    assert "layer9.*.conv1" in str(info.value)
    assert "layer1.0.conv1" in str(info.value)


def test_preset_missing_from_model_is_explained() -> None:
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(DamageSpecError, match=r"D4 \(layer4\.\*\.conv1\)") as info:
        damage_masks(tiny, DamageSpec(fraction=0.5, targets=["D4"]))
    assert info.value.field == "targets"


def test_target_without_weight_is_refused(model: nn.Module) -> None:
    with pytest.raises(DamageSpecError, match="no weight parameter") as info:
        resolve_targets(model, DamageSpec(fraction=0.5, targets=["layer1"]))
    assert info.value.field == "targets"


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"fraction": 0}, ("fraction",)),
        ({"fraction": -0.1}, ("fraction",)),
        ({"fraction": 1.0001}, ("fraction",)),
        ({"fraction": float("nan")}, ("fraction",)),
        ({"fraction": 0.5, "fault": {"kind": "melt"}}, ("fault",)),
        ({"fraction": 0.5, "fault": {"kind": "bit_flip", "bits": [32]}}, ("fault", "bit_flip")),
        ({"fraction": 0.5, "fault": {"kind": "bit_flip", "bits": [3, 3]}}, ("fault", "bit_flip")),
        ({"fraction": 0.5, "fault": {"kind": "gaussian", "sigma": 0}}, ("fault", "gaussian")),
        ({"fraction": 0.5, "fault": {"kind": "stuck_at", "value": "inf"}}, ("fault", "stuck_at")),
        ({"fraction": 0.5, "seed": -1}, ("seed",)),
        ({"fraction": 0.5, "targets": []}, ("targets",)),
    ],
)
def test_bad_specs_name_the_field(payload: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        DamageSpec.model_validate(payload)
    assert info.value.errors()[0]["loc"][: len(loc)] == loc


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("numel", "fraction", "expected"),
    [(1000, 0.05, 50), (9, 0.5, 4), (11, 0.5, 6), (7, 0.5, 4), (19, 0.05, 1), (9, 0.05, 0)],
)
def test_damaged_count_rounds_half_to_even(numel: int, fraction: float, expected: int) -> None:
    assert damaged_count(numel, fraction) == expected


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5, 0.95, 1.0])
def test_exactly_round_d_n_weights_per_layer(model: nn.Module, fraction: float) -> None:
    masks = damage_masks(model, DamageSpec(fraction=fraction))
    assert list(masks) == [f"{name}.weight" for name in CONV1]
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert mask.dtype == torch.bool
        assert mask.shape == weight.shape
        assert int(mask.sum()) == round(fraction * weight.numel())
    if fraction == 1.0:
        assert all(bool(mask.all()) for mask in masks.values())


def test_rounding_reaches_the_layer() -> None:
    layer = nn.Sequential(nn.Linear(3, 3, bias=False))  # N = 9, 0.5 · 9 = 4.5 → 4
    assert int(damage_masks(layer, DamageSpec(fraction=0.5, targets=["0"]))["0.weight"].sum()) == 4


def test_masks_are_nested_across_fractions(model: nn.Module) -> None:
    fractions = [round(0.05 * i, 2) for i in range(1, 20)]
    masks = [damage_masks(model, DamageSpec(fraction=f, targets=["D2", "D3"])) for f in fractions]
    for smaller, larger in pairwise(masks):
        for name in smaller:
            assert not (smaller[name] & ~larger[name]).any(), name
            assert int(smaller[name].sum()) < int(larger[name].sum())


def test_fault_values_are_nested_too(model: nn.Module) -> None:
    # A weight damaged at 20 % gets the same Gaussian fault value at 60 %.
    low = apply_damage(model, DamageSpec(fraction=0.2, fault=Gaussian(), targets=["D2"]))
    low_weights = _snapshot(model)
    low.restore()
    apply_damage(model, DamageSpec(fraction=0.6, fault=Gaussian(), targets=["D2"]))
    for name, mask in low.masks.items():
        assert torch.equal(model.get_parameter(name).detach()[mask], low_weights[name][mask])


def test_a_layer_mask_does_not_depend_on_the_other_targets(model: nn.Module) -> None:
    alone = damage_masks(model, DamageSpec(fraction=0.3, targets=["D4"]))
    together = damage_masks(model, DamageSpec(fraction=0.3))
    for name, mask in alone.items():
        assert torch.equal(mask, together[name])


def test_seed_reproduces_masks(model: nn.Module) -> None:
    same = [damage_masks(model, DamageSpec(fraction=0.5, seed=3)) for _ in range(2)]
    other = damage_masks(model, DamageSpec(fraction=0.5, seed=4))
    for name in same[0]:
        assert torch.equal(same[0][name], same[1][name])
        assert not torch.equal(same[0][name], other[name])
    fresh = resnet18(num_classes=4)  # different weights, same architecture: same masks
    for name, mask in damage_masks(fresh, DamageSpec(fraction=0.5, seed=3)).items():
        assert torch.equal(mask, same[0][name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_and_faults_do_not_depend_on_the_device(model: nn.Module) -> None:
    spec = DamageSpec(fraction=0.4, fault=BitFlip(), seed=11)
    cpu_masks = damage_masks(model, spec)
    on_gpu = resnet18(num_classes=4)
    on_gpu.load_state_dict(model.state_dict())
    on_gpu.cuda()
    gpu = apply_damage(on_gpu, spec)
    cpu = apply_damage(model, spec)
    for name, mask in cpu_masks.items():
        assert gpu.masks[name].is_cuda
        assert torch.equal(gpu.masks[name].cpu(), mask)
        assert torch.equal(
            gpu.faults[name].cpu().view(torch.int32), cpu.faults[name].view(torch.int32)
        )


# --------------------------------------------------------------------------- injection


def test_apply_damage_touches_only_the_masked_weights(model: nn.Module) -> None:
    before = _snapshot(model)
    damage = apply_damage(model, DamageSpec(fraction=0.5))
    after = _snapshot(model)
    for name, value in before.items():
        if name in damage.masks:
            mask = damage.masks[name]
            assert torch.equal(after[name][~mask], value[~mask])
            assert torch.equal(after[name][mask], torch.zeros(int(mask.sum())))
            assert torch.equal(damage.intact[name], value)
            assert torch.equal(damage.faults[name], after[name])
        else:  # batch norm, downsample (skip connections), conv2, fc, biases, buffers
            assert torch.equal(after[name], value), name
    assert damage.verify().ok


def test_restore_is_exact(model: nn.Module) -> None:
    before = _snapshot(model)
    apply_damage(model, DamageSpec(fraction=0.7, fault=BitFlip(), seed=5)).restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_bit_flip_damage_flips_one_bit_of_each_damaged_weight(model: nn.Module) -> None:
    before = _snapshot(model)
    damage = apply_damage(model, DamageSpec(fraction=0.25, fault=BitFlip(), targets=["D1"]))
    for name, mask in damage.masks.items():
        xor = before[name].view(torch.int32) ^ model.get_parameter(name).detach().view(torch.int32)
        popcount = torch.stack([(xor >> b) & 1 for b in range(32)]).sum(0)
        assert torch.equal(popcount, mask.int())


def test_damaged_context_restores_after_an_exception(model: nn.Module) -> None:
    before = _snapshot(model)
    first = CONV1[0] + ".weight"

    def fail_while_damaged() -> None:
        with damaged(model, DamageSpec(fraction=0.5)) as damage:
            assert not torch.equal(model.get_parameter(first), before[first])
            assert damage.verify().ok
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_damaged()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --------------------------------------------------------------------------- permanence


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


# Exponent bits are left out: a weight of ~1e30 would make the loss diverge and the "undamaged
# weights did change" check meaningless; bit_flip's exactness does not depend on which bit.
_SAFE_BITS = BitFlip(bits=[*range(23), 31])


@pytest.mark.parametrize("make_optimizer", [_sgd, _adamw], ids=["sgd-nesterov-wd", "adamw"])
@pytest.mark.parametrize(
    "fault", [StuckAt(), StuckAt(value=0.25), _SAFE_BITS], ids=["stuck0", "stuck0.25", "bitflip"]
)
def test_damage_is_exactly_permanent_through_training(
    small: nn.Module,
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    fault: StuckAt | BitFlip,
) -> None:
    model = small
    damage = apply_damage(model, DamageSpec(fraction=0.5, fault=fault))
    assert set(damage.masks) == {f"{n}.weight" for n in CONV1}  # never bn nor downsample
    before = _snapshot(model)
    optimizer = make_optimizer(model.parameters())
    with hold_damage(model, damage.masks, optimizer):
        _train(model, optimizer, steps=50)
        if fault == StuckAt():  # no gradient, hence no optimizer state, at damaged positions
            for name, mask in damage.masks.items():
                param = model.get_parameter(name)
                assert param.grad is not None
                assert not param.grad[mask].any()
                for value in optimizer.state[param].values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        assert not value[mask].any()
    for name, mask in damage.masks.items():
        weight = model.get_parameter(name).detach()
        held = damage.faults[name][mask]
        assert torch.equal(weight[mask].view(torch.int32), held.view(torch.int32))
        changed = weight[~mask] != before[name][~mask]
        assert changed.float().mean() > 0.9, f"undamaged weights of {name} barely trained"
    assert damage.verify().ok


def test_gradient_masking_alone_is_not_enough() -> None:
    # The trap hold_damage avoids: weight decay moves a weight stuck at a non-zero value even
    # though its gradient is masked.
    layer = nn.Linear(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    with torch.no_grad():
        layer.weight[mask] = 0.25
    layer.weight.register_hook(lambda grad: grad.masked_fill(mask, 0))
    optimizer = _sgd(layer.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    assert not torch.equal(layer.weight[mask], torch.full((4,), 0.25))


def test_entry_reimposes_the_fault_values(model: nn.Module) -> None:
    damage = apply_damage(model, DamageSpec(fraction=0.5, fault=StuckAt(value=0.5), targets=["D1"]))
    with torch.no_grad():
        for name in damage.masks:
            model.get_parameter(name).add_(1.0)
    assert not damage.verify().ok
    optimizer = _adamw(model.parameters())
    with damage.hold(optimizer):
        assert damage.verify().ok


@pytest.mark.parametrize("fails", [False, True])
def test_hooks_are_removed_on_exit(small: nn.Module, fails: bool) -> None:
    model = small
    damage = apply_damage(model, DamageSpec(fraction=0.5, targets=["D2"]))
    optimizer = _sgd(model.parameters())

    def step_once() -> None:
        with hold_damage(model, damage.masks, optimizer):
            _train(model, optimizer, steps=1)
            if fails:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted") if fails else nullcontext():
        step_once()
    assert damage.verify().ok
    _train(model, optimizer, steps=1)
    name, mask = next(iter(damage.masks.items()))
    param = model.get_parameter(name)
    assert param.grad is not None
    assert param.grad[mask].any()  # gradient hook gone
    assert verify_damage(model, damage.masks, damage.faults).mismatched[name] > 0  # step hook gone


def test_frozen_damaged_layers_are_held_too(small: nn.Module) -> None:
    damage = apply_damage(small, DamageSpec(fraction=0.5, fault=StuckAt(value=0.25)))
    small.layer1.requires_grad_(False)
    optimizer = _adamw([p for p in small.parameters() if p.requires_grad])
    with damage.hold(optimizer):
        _train(small, optimizer, steps=2)
    assert damage.verify().ok


def test_verify_damage_counts_a_tampered_weight(model: nn.Module) -> None:
    damage = apply_damage(model, DamageSpec(fraction=0.1, targets=["D4"]))
    name, mask = next(iter(damage.masks.items()))
    with torch.no_grad():
        model.get_parameter(name)[mask.nonzero()[0].unbind()] = 1.0
    check = verify_damage(model, damage.masks, fault_values(model, damage.masks))
    assert check.ok
    check = damage.verify()
    assert not check.ok
    assert check.mismatched[name] == 1
    assert check.as_dict()["mismatched"] == 1
    assert check.as_dict()["damaged"] == sum(int(m.sum()) for m in damage.masks.values())


def test_bad_masks_and_values_name_the_argument(model: nn.Module) -> None:
    optimizer = _sgd(model.parameters())
    with (
        pytest.raises(DamageSpecError) as info,
        hold_damage(model, {"nope.weight": torch.ones(1, dtype=torch.bool)}, optimizer),
    ):
        pass
    assert info.value.field == "masks"
    masks = damage_masks(model, DamageSpec(fraction=0.5, targets=["D1"]))
    with pytest.raises(DamageSpecError) as info:
        verify_damage(model, {k: m.float() for k, m in masks.items()}, {})
    assert info.value.field == "masks"
    with pytest.raises(DamageSpecError) as info:
        verify_damage(model, masks, {k: torch.zeros(3) for k in masks})
    assert info.value.field == "values"


# --------------------------------------------------------------------------- retraining


@pytest.fixture(scope="module")
def splits(ucm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DataSplits:
    """Four real UC Merced images per class at 32 px (symlinks), one per class held out."""
    root = tmp_path_factory.mktemp("ucm-damage")
    for name in CLASSES:
        (root / name).mkdir()
        for image in sorted((ucm_dir / name).glob("*.jpg"))[:4]:
            (root / name / image.name).symlink_to(image)
    folder = ImageFolder.from_path(root)
    return load_splits(
        folder, Preprocessing(input_size=32), val_fraction=0.25, test_fraction=0.0, seed=0
    )


def _retrain_config() -> TrainConfig:
    return TrainConfig(
        epochs=2, batch_size=3, lr=0.01, nesterov=True, weight_decay=1e-2, device="cpu"
    )


def test_retrain_updates_only_undamaged_weights(splits: DataSplits) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES))
    damage = apply_damage(model, DamageSpec(fraction=0.5, fault=StuckAt(value=0.1)))
    before = _snapshot(model)
    result = retrain(model, damage.masks, splits.train, splits.val, _retrain_config())
    assert result.epochs_run == 2
    assert result.history[-1].val_accuracy is not None
    assert damage.verify().ok
    for name, mask in damage.masks.items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight[mask], torch.full((int(mask.sum()),), 0.1))
        assert not torch.equal(weight[~mask], before[name][~mask])


def test_retrain_refuses_to_return_a_model_whose_damage_moved(
    model: nn.Module, splits: DataSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training loop that ignores its step guard must not pass unnoticed.
    damage = apply_damage(model, DamageSpec(fraction=0.5, targets=["D4"]))

    def careless_fit(model: nn.Module, *args: object, **kwargs: object) -> None:
        with torch.no_grad():
            for name in damage.masks:
                model.get_parameter(name).add_(1.0)

    monkeypatch.setattr("core.damage.fit", careless_fit)
    with pytest.raises(RuntimeError, match="moved damaged weights"):
        retrain(model, damage.masks, splits.train, None, _retrain_config())


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def source_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "intact.safetensors"
    save_checkpoint(
        path, build_model("resnet18", 3), CheckpointMeta(arch="resnet18", classes=CLASSES)
    )
    return path


@pytest.mark.parametrize("fault", [StuckAt(), _SAFE_BITS], ids=["stuck0", "bitflip"])
def test_damaged_checkpoint_round_trip(
    source_checkpoint: Path, tmp_path: Path, fault: StuckAt | BitFlip
) -> None:
    spec = DamageSpec(fraction=0.3, targets=["D1", "D4"], fault=fault, seed=2)
    dst = tmp_path / "damaged.safetensors"
    digest = damage_checkpoint(source_checkpoint, spec, dst)
    assert digest == file_digest(dst)

    parent = load_checkpoint(source_checkpoint)
    ckpt = load_checkpoint(dst)
    assert ckpt.meta.damage == spec
    assert ckpt.meta.has_damage_masks
    step = ckpt.meta.lineage[-1]
    assert (step.op, step.parent_digest) == ("damage", file_digest(source_checkpoint))
    assert DamageSpec.model_validate(step.params) == spec

    # Same masks and fault values as damaging the parent in memory.
    reference, _ = load_model(source_checkpoint)
    expected = apply_damage(reference, spec)
    assert ckpt.damage_masks.keys() == expected.masks.keys()
    for name, mask in expected.masks.items():
        assert torch.equal(ckpt.damage_masks[name], mask)
        assert torch.equal(
            ckpt.state_dict[name].view(torch.int32), reference.state_dict()[name].view(torch.int32)
        )
        assert torch.equal(ckpt.state_dict[name][~mask], parent.state_dict[name][~mask])
    for name, tensor in parent.state_dict.items():
        if name not in expected.masks:
            assert torch.equal(ckpt.state_dict[name], tensor), name

    # A plain torchvision model runs the damaged weights.
    plain = resnet18(num_classes=len(CLASSES))
    plain.load_state_dict(ckpt.state_dict)
    loaded, _ = load_model(dst)
    assert verify_damage(loaded, ckpt.damage_masks, expected.faults).ok
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), loaded(images))


def test_damaging_a_damaged_checkpoint_composes(source_checkpoint: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "d4.safetensors", tmp_path / "d4d1.safetensors"
    damage_checkpoint(source_checkpoint, DamageSpec(fraction=0.2, targets=["D4"]), first)
    damage_checkpoint(first, DamageSpec(fraction=0.4, targets=["D1", "D4"], seed=1), second)
    ckpt = load_checkpoint(second)
    assert [step.op for step in ckpt.meta.lineage][-2:] == ["damage", "damage"]
    assert ckpt.meta.lineage[-1].parent_digest == file_digest(first)
    earlier = load_checkpoint(first).damage_masks
    assert set(ckpt.damage_masks) == {f"{n}.weight" for n in CONV1 if n[5] in "14"}
    for name, mask in earlier.items():
        assert not (mask & ~ckpt.damage_masks[name]).any()  # earlier damage stays
    for name, mask in ckpt.damage_masks.items():
        assert not ckpt.state_dict[name][mask].any()
