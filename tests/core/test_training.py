"""Training loop, transfer learning and the training configuration, on a handful of real UC
Merced images with a ResNet-18 at 32 px (seconds on two CPU cores)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from core.checkpoint import load_model
from core.damage import apply_damage
from core.damage_spec import DamageSpec
from core.datasets import ImageDataset, ImageFolder
from core.exceptions import CancelledError, CheckpointError, DatasetError, InputError
from core.models import build_model
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.train_spec import CheckpointInit, ImageNetInit, ScratchInit, TrainConfig
from core.training import fit, train_classifier
from core.training_data import CachedImageDataset, DataSplits, load_splits, training_split
from core.transforms import train_transform

CLASSES = ["agricultural", "beach", "forest"]
PER_CLASS = 6
SIZE = 32


@pytest.fixture(scope="module")
def tiny_root(ucm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder copy (symlinks) of the first images of three visually distinct classes."""
    root = tmp_path_factory.mktemp("ucm-tiny")
    for name in CLASSES:
        (root / name).mkdir()
        for image in sorted((ucm_dir / name).glob("*.jpg"))[:PER_CLASS]:
            (root / name / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="module")
def pre() -> Preprocessing:
    return Preprocessing(input_size=SIZE)


@pytest.fixture(scope="module")
def data(tiny_root: Path, pre: Preprocessing) -> DataSplits:
    folder = ImageFolder.from_path(tiny_root)
    return load_splits(folder, pre, val_fraction=0.2, test_fraction=0.0, seed=0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", len(CLASSES))


def _config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = {"epochs": 2, "batch_size": 6, "lr": 0.01, "device": "cpu"}
    return TrainConfig.model_validate({**settings, **overrides})


def _states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- fit


def test_fit_overfits_a_tiny_set(data: DataSplits) -> None:
    model = _model()
    result = fit(model, data.train, None, _config(epochs=8, optimizer="adamw", lr=1e-3))
    losses = [epoch.train_loss for epoch in result.history]
    assert len(losses) == 8
    # Batches of 6 with augmentation make single epochs noisy: compare the last two.
    assert max(losses[-2:]) < 0.5 * losses[0]
    assert result.history[-1].train_accuracy >= 0.9
    assert result.best_epoch == 8  # no validation set: the last epoch
    assert result.device == "cpu"
    assert result.precision == "float32"
    assert not result.stopped_early


def test_fit_reports_history_and_cosine_schedule(data: DataSplits) -> None:
    result = fit(_model(), data.train, data.val, _config(epochs=3, lr=0.1))
    assert [e.epoch for e in result.history] == [1, 2, 3]
    # Cosine annealing over 3 epochs: lr_e = 0.1 · (1 + cos(π e / 3)) / 2 for e = 0, 1, 2.
    assert [e.lr for e in result.history] == pytest.approx([0.1, 0.075, 0.025])
    for epoch in result.history:
        assert epoch.val_accuracy is not None
        assert 0.0 <= epoch.val_accuracy <= 1.0
        assert epoch.val_loss is not None
        assert epoch.val_loss > 0
    best = max(result.history, key=lambda e: e.val_accuracy or 0.0)
    assert result.best_val_accuracy == best.val_accuracy


def test_fit_is_bit_identical_for_one_seed_on_cpu(data: DataSplits) -> None:
    config = _config(epochs=2, seed=7)
    runs = []
    for seed in (7, 7, 8):
        model = _model()
        fit(model, data.train, None, config.model_copy(update={"seed": seed}))
        runs.append(model.state_dict())
    assert _states_equal(runs[0], runs[1])
    assert not _states_equal(runs[0], runs[2])  # the seed matters (shuffle, augmentation)


def test_fit_leaves_the_callers_rng_alone(data: DataSplits) -> None:
    model = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, data.train, None, _config(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_stops_and_restores_the_best_epoch(data: DataSplits) -> None:
    # Three validation images: the accuracy can rise strictly at most three times, so with
    # patience 1 training must stop by epoch 5 of 12.
    assert data.val is not None
    assert len(data.val) == 3
    model = _model()
    states: dict[int, dict[str, Tensor]] = {}

    def snapshot(p: Progress) -> None:
        if "val_accuracy" in p.metrics:  # the epoch-end report
            states[p.metrics["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    result = fit(model, data.train, data.val, _config(epochs=12, patience=1), progress=snapshot)
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 1 <= 5
    best = result.history[result.best_epoch - 1]
    assert all((e.val_accuracy or 0) <= (best.val_accuracy or 0) for e in result.history)
    assert result.restored_best
    assert _states_equal(model.state_dict(), states[result.best_epoch])
    assert not _states_equal(model.state_dict(), states[len(result.history)])


def test_progress_reports_carry_sane_metrics(data: DataSplits) -> None:
    reports: list[Progress] = []
    fit(_model(), data.train, data.val, _config(epochs=3), progress=reports.append)
    assert reports
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions)
    assert fractions[0] > 0.0
    assert fractions[-1] == pytest.approx(1.0)
    for p in reports:
        assert p.stage == "train"
        assert {"epoch", "epochs", "step", "steps", "loss", "accuracy"} <= p.metrics.keys()
        assert 1 <= p.metrics["epoch"] <= 3
        assert 1 <= p.metrics["step"] <= p.metrics["steps"]
        assert p.metrics["loss"] > 0
        assert 0.0 <= p.metrics["accuracy"] <= 1.0
    epoch_ends = [p for p in reports if "val_accuracy" in p.metrics]
    assert [p.metrics["epoch"] for p in epoch_ends] == [1, 2, 3]


def test_should_stop_cancels_between_steps(data: DataSplits) -> None:
    model = _model().eval()
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > 2

    with pytest.raises(CancelledError, match="training"):
        fit(model, data.train, None, _config(epochs=3, batch_size=4), should_stop=should_stop)
    assert polls == 3
    assert not model.training  # the caller's eval mode is back


def test_step_guard_wraps_every_optimizer_step(data: DataSplits) -> None:
    events: list[str] = []

    @contextmanager
    def guard(optimizer: torch.optim.Optimizer) -> Iterator[None]:
        events.append("enter")
        handle = optimizer.register_step_post_hook(lambda *_: events.append("step"))
        try:
            yield
        finally:
            handle.remove()
            events.append("exit")

    fit(_model(), data.train, None, _config(epochs=2, batch_size=6), step_guard=guard)
    steps = 2 * -(-len(data.train) // 6)
    assert events == ["enter", *["step"] * steps, "exit"]


def test_masked_retraining_keeps_damaged_weights_at_zero(data: DataSplits) -> None:
    model = _model()
    damage = apply_damage(model, DamageSpec(targets=["D1", "D4"], fraction=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in damage.masks}

    # Weight decay and Nesterov momentum would move a merely gradient-masked weight.
    config = _config(epochs=2, weight_decay=0.01, nesterov=True)
    result = fit(model, data.train, None, config, step_guard=damage.hold)

    assert result.epochs_run == 2
    assert damage.verify().ok
    for name, param in model.named_parameters():
        if name in damage.masks:
            mask = damage.masks[name]
            assert torch.count_nonzero(param[mask]) == 0
            assert not torch.equal(param[~mask], before[name][~mask])  # the rest did train


def test_fit_refuses_unusable_inputs(data: DataSplits) -> None:
    with pytest.raises(DatasetError) as info:
        fit(_model(), data.train, None, _config(patience=2))
    assert info.value.field == "val_ds"
    with pytest.raises(DatasetError) as empty:
        fit(_model(), [], None, _config())  # type: ignore[arg-type]
    assert empty.value.field == "train_ds"
    if not torch.cuda.is_available():
        with pytest.raises(InputError) as device:
            fit(_model(), data.train, None, _config(device="cuda"))
        assert device.value.field == "device"


def test_divergence_names_the_learning_rate(data: DataSplits) -> None:
    linear = nn.Linear(3 * SIZE * SIZE, len(CLASSES))
    with torch.no_grad():
        linear.weight.fill_(float("inf"))  # what an exploding learning rate ends in
    model = nn.Sequential(nn.Flatten(), linear)
    with pytest.raises(InputError, match="diverged") as info:
        fit(model, data.train, None, _config(epochs=1))
    assert info.value.field == "lr"


# --------------------------------------------------------------------------- data


def test_cached_dataset_matches_decoding_every_time(tiny_root: Path, pre: Preprocessing) -> None:
    samples = ImageFolder.from_path(tiny_root).samples[:4]
    for resize in ("stretch", "center_crop"):
        p = pre.model_copy(update={"resize": resize})
        plain = ImageDataset(samples, train_transform(p))
        cached = CachedImageDataset(samples, p, train_transform(p))
        for i in range(len(samples)):
            torch.manual_seed(i)  # the same augmentation draw for both
            x, y = plain[i]
            torch.manual_seed(i)
            cx, cy = cached[i]
            assert y == cy
            assert torch.equal(x, cx)


# --------------------------------------------------------------------------- classifiers


def test_train_classifier_records_lineage_and_reloads(tiny_root: Path, tmp_path: Path) -> None:
    config = _config(epochs=2, input_size=SIZE, val_fraction=0.2, test_fraction=0.2, seed=3)
    trained = train_classifier(tiny_root, "resnet18", config)

    assert trained.meta.arch == "resnet18"
    assert trained.meta.classes == CLASSES
    assert trained.meta.preprocessing.input_size == SIZE
    [step] = trained.meta.lineage
    assert step.op == "train"
    assert step.parent_digest is None
    assert TrainConfig.model_validate(step.params["config"]) == config
    assert training_split(trained.meta) is not None
    assert trained.evaluation is not None
    assert trained.evaluation.count == len(trained.split.test) == 3
    assert not trained.model.training

    digest = trained.save(tmp_path / "m.safetensors")
    model, ckpt = load_model(tmp_path / "m.safetensors")
    assert ckpt.digest == digest
    assert ckpt.meta.classes == CLASSES
    assert _states_equal(model.state_dict(), trained.model.state_dict())


def test_transfer_from_a_checkpoint_with_other_classes(
    tiny_root: Path, ucm_dir: Path, tmp_path: Path
) -> None:
    parent = train_classifier(
        tiny_root, "resnet18", _config(epochs=1, input_size=SIZE, test_fraction=0.0)
    )
    parent_digest = parent.save(tmp_path / "parent.safetensors")
    parent_state = {k: v.clone() for k, v in parent.model.state_dict().items()}

    # Two classes the parent knows, in another order, and one it does not.
    child_root = tmp_path / "child"
    for name in ("forest", "harbor", "beach"):
        (child_root / name).mkdir(parents=True)
        source = tiny_root / name if name in CLASSES else ucm_dir / name
        for image in sorted(source.glob("*.jpg"))[:4]:
            (child_root / name / image.name).symlink_to(image.resolve())
    init = CheckpointInit(checkpoint=str(tmp_path / "parent.safetensors"))
    # A learning rate of ~0 shows what was carried over; BN statistics still move, so compare
    # weights only.
    config = _config(epochs=1, lr=1e-12, init=init, val_fraction=0.0, test_fraction=0.0)
    child = train_classifier(child_root, None, config, classes=["forest", "harbor", "beach"])

    state = child.model.state_dict()
    assert child.meta.classes == ["forest", "harbor", "beach"]
    assert child.meta.preprocessing == parent.meta.preprocessing  # kept: no input_size given
    assert torch.allclose(state["conv1.weight"], parent_state["conv1.weight"], atol=1e-9)
    for row, name in ((0, "forest"), (2, "beach")):
        parent_row = CLASSES.index(name)
        assert torch.allclose(state["fc.weight"][row], parent_state["fc.weight"][parent_row])
        assert torch.allclose(state["fc.bias"][row], parent_state["fc.bias"][parent_row])
    assert not torch.allclose(state["fc.weight"][1], parent_state["fc.weight"][0])
    assert [s.op for s in child.meta.lineage] == ["train", "train"]
    assert child.meta.lineage[-1].parent_digest == parent_digest


def test_checkpoint_init_must_match_the_architecture(tiny_root: Path, tmp_path: Path) -> None:
    parent = train_classifier(tiny_root, "resnet18", _config(epochs=1, input_size=SIZE))
    parent.save(tmp_path / "p.safetensors")
    init = CheckpointInit(checkpoint=str(tmp_path / "p.safetensors"))
    with pytest.raises(CheckpointError) as info:
        train_classifier(tiny_root, "resnet34", _config(init=init))
    assert info.value.field == "init"
    with pytest.raises(InputError) as no_arch:
        train_classifier(tiny_root, None, _config())
    assert no_arch.value.field == "arch"


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 10_000}, "batch_size"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"nesterov": True, "optimizer": "adamw"}, "nesterov"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
        ({"patience": 3, "val_fraction": 0.0}, "val_fraction"),
        ({"input_size": 8}, "input_size"),
        ({"device": "tpu"}, "device"),
        ({"init": "pretrained"}, "init"),
        ({"init": {"kind": "checkpoint"}}, "init"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_config_errors_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(settings)
    assert info.value.errors()[0]["loc"][0] == field


def test_config_init_forms_round_trip_through_json() -> None:
    assert TrainConfig().init == ScratchInit()
    assert TrainConfig.model_validate({"init": "imagenet"}).init == ImageNetInit()
    config = TrainConfig(init=CheckpointInit(checkpoint="a.safetensors"), patience=2)
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config
