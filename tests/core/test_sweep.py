from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from core.damage import damage_masks
from core.damage_spec import DamageSpec
from core.datasets import ImageDataset, ImageFolder, Sample
from core.exceptions import CancelledError, DamageSpecError, DatasetError, InputError
from core.models import build_model
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.sweep import (
    CellKey,
    EvalSet,
    RetrainData,
    SweepResult,
    balanced_subset,
    run_sweep,
)
from core.sweep_report import (
    JsonlWriter,
    mean_ci,
    read_rows_jsonl,
    summarize,
    write_report,
)
from core.sweep_spec import (
    DEFAULT_FRACTIONS,
    SweepConfig,
    SweepReport,
    SweepRow,
    parse_fractions,
)
from core.sweep_stages import Stages
from core.train_spec import TrainConfig
from core.transforms import eval_transform, train_transform

CLASSES = ["airplane", "beach", "forest", "harbor"]
PRE = Preprocessing(input_size=64)


@pytest.fixture(scope="module")
def folder(ucm_dir: Path) -> ImageFolder:
    return ImageFolder.from_path(ucm_dir, classes=CLASSES)


@pytest.fixture(scope="module")
def eval_set(folder: ImageFolder) -> EvalSet:
    # 7 real images, batches of 3: the last batch is partial.
    return EvalSet.from_dataset(
        ImageDataset(balanced_subset(folder.samples, 7), eval_transform(PRE))
    )


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES)).eval()


def config(**overrides: object) -> SweepConfig:
    settings: dict[str, object] = {"fractions": [0.3, 0.8], "trials": 1, "batch_size": 3}
    return SweepConfig.model_validate(settings | overrides)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_outputs(fast: SweepResult, naive: SweepResult) -> None:
    assert fast.outputs.keys() == naive.outputs.keys()
    assert torch.equal(fast.intact.predictions, naive.intact.predictions)
    assert torch.equal(fast.intact.maps, naive.intact.maps)
    for key, out in fast.outputs.items():
        ref = naive.outputs[key]
        assert torch.equal(out.predictions, ref.predictions), key
        assert torch.equal(out.targets, ref.targets), key
        assert torch.equal(out.maps, ref.maps), key  # bit for bit, not approximately
    assert [r.model_dump() for r in fast.rows] == [r.model_dump() for r in naive.rows]


# --------------------------------------------------------------------------- fast == naive


def test_fast_path_gives_exactly_the_naive_results(model: nn.Module, eval_set: EvalSet) -> None:
    cfg = config()
    fast = run_sweep(model, "resnet18", eval_set, cfg)
    naive = run_sweep(model, "resnet18", eval_set, cfg, strategy="naive")
    assert_same_outputs(fast, naive)
    assert len(fast.rows) == 4 * 2
    # Damage at 80 % of a random network changes something somewhere.
    assert any(row.flip_rate > 0 or row.cam_correlation != 1.0 for row in fast.rows)


def test_fast_path_matches_for_gradcam_and_true_class_maps(
    model: nn.Module, eval_set: EvalSet
) -> None:
    cfg = config(locations=["D3"], method="gradcam", cam_class="label", fractions=[0.5])
    fast = run_sweep(model, "resnet18", eval_set, cfg)
    assert_same_outputs(fast, run_sweep(model, "resnet18", eval_set, cfg, strategy="naive"))
    for output in (fast.intact, *fast.outputs.values()):
        assert torch.equal(output.targets, eval_set.labels)


def test_chunked_activation_cache_changes_nothing(model: nn.Module, eval_set: EvalSet) -> None:
    chunks: set[int] = set()

    def record(p: Progress) -> None:
        chunks.add(int(p.metrics.get("chunk", 0)))

    whole = run_sweep(model, "resnet18", eval_set, config(locations=["D2"]))
    # 64 px: 64×16×16 float32 activations enter layer2 (64 KiB per image): one batch per chunk.
    chunked = run_sweep(
        model, "resnet18", eval_set, config(locations=["D2"], cache_mb=0.1), progress=record
    )
    assert chunks == {0, 1, 2}
    assert_same_outputs(chunked, whole)


def test_sweep_leaves_weights_and_modes_as_they_were(model: nn.Module, eval_set: EvalSet) -> None:
    model.train()
    model.get_submodule("layer2").eval()  # a mixed mode must come back exactly so
    before = snapshot(model)
    run_sweep(model, "resnet18", eval_set, config(fractions=[0.95], trials=2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert model.training
    assert not model.get_submodule("layer2").training
    assert model.get_submodule("layer3").training


# --------------------------------------------------------------------------- progress, cancel


def test_progress_per_cell_and_rows_as_they_finish(
    model: nn.Module, eval_set: EvalSet, tmp_path: Path
) -> None:
    reports: list[Progress] = []
    readable: list[int] = []
    writer = JsonlWriter(tmp_path / "cells.jsonl")

    def on_cell(row: SweepRow) -> None:
        writer(row)
        readable.append(len(read_rows_jsonl(writer.path)))  # partial results, mid-sweep

    cfg = config(locations=["D1", "D4"], trials=2)
    result = run_sweep(model, "resnet18", eval_set, cfg, progress=reports.append, on_cell=on_cell)
    cells = [r for r in reports if r.stage == "sweep"]
    assert len(cells) == cfg.cells
    assert {(r.metrics["location"], r.metrics["fraction"], r.metrics["trial"]) for r in cells} == {
        (row.location, row.fraction, row.trial) for row in result.rows
    }
    fractions = [r.fraction for r in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert readable == list(range(1, cfg.cells + 1))
    assert read_rows_jsonl(writer.path) == sorted(
        result.rows, key=lambda r: (r.location, r.trial, r.fraction)
    )


@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_cancel_between_cells_restores_the_model(
    model: nn.Module, eval_set: EvalSet, strategy: str
) -> None:
    before = snapshot(model)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    rows: list[object] = []
    with pytest.raises(CancelledError):
        run_sweep(
            model,
            "resnet18",
            eval_set,
            config(),
            strategy=strategy,  # type: ignore[arg-type]
            should_stop=should_stop,
            on_cell=rows.append,
        )
    assert len(rows) == 3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- retraining


def test_masked_retraining_at_chosen_levels(
    model: nn.Module, eval_set: EvalSet, folder: ImageFolder
) -> None:
    train = ImageDataset(balanced_subset(folder.samples[1::9], 8), train_transform(PRE))
    cfg = config(
        locations=["D4"],
        fractions=[0.3, 0.6],
        retrain_at=[0.6],
        retrain=TrainConfig(epochs=1, batch_size=4, device="cpu", val_fraction=0.0),
    )
    before = snapshot(model)
    key = CellKey("D4", 0.6, 0)
    result = run_sweep(
        model, "resnet18", eval_set, cfg, retrain_data=RetrainData(train), keep_retrained=[key]
    )
    assert [row.retrained is not None for row in result.rows] == [False, True]
    assert result.rows[1].retrain_epochs == 1
    assert result.retrained_outputs.keys() == {key}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The retrained copy learnt, yet its damaged weights still read their fault value (0).
    retrained = result.retrained_models[key]
    spec = DamageSpec(targets=["D4"], fraction=0.6, seed=0)
    params = dict(retrained.named_parameters())
    for name, mask in damage_masks(retrained, spec).items():
        assert params[name].detach()[mask].eq(0).all()
    moved = [k for k, v in retrained.state_dict().items() if not torch.equal(v, before[k])]
    assert any(name.startswith("layer4.0.conv1") for name in moved)
    assert any(name.startswith("fc.") for name in moved)
    summary = summarize(result.rows)
    assert "retrained_accuracy" in summary[1].metrics
    assert "retrained_accuracy" not in summary[0].metrics


def test_retraining_needs_data(model: nn.Module, eval_set: EvalSet) -> None:
    with pytest.raises(InputError) as info:
        run_sweep(model, "resnet18", eval_set, config(retrain_at=[0.3]))
    assert info.value.field == "retrain_at"


# --------------------------------------------------------------------------- validation


def test_unknown_location_names_the_argument(model: nn.Module, eval_set: EvalSet) -> None:
    with pytest.raises(DamageSpecError) as info:
        run_sweep(model, "resnet18", eval_set, config(locations=["D1", "layer9.*"]))
    assert info.value.field == "locations"


def test_labels_outside_the_model_are_refused(model: nn.Module, eval_set: EvalSet) -> None:
    bad = EvalSet(eval_set.inputs, torch.full_like(eval_set.labels, len(CLASSES)))
    with pytest.raises(DatasetError):
        run_sweep(model, "resnet18", bad, config())


def test_config_validation() -> None:
    assert SweepConfig().fractions == list(DEFAULT_FRACTIONS)
    assert SweepConfig().cells == 4 * 19 * 3
    with pytest.raises(ValidationError, match="retrain_at"):
        SweepConfig(fractions=[0.1, 0.2], retrain_at=[0.5])
    with pytest.raises(ValidationError):
        SweepConfig(fractions=[0.0])
    with pytest.raises(ValidationError):
        SweepConfig(locations=["D1", "D1"])
    assert SweepConfig(fractions=[0.5, 0.1]).fractions == [0.1, 0.5]


def test_parse_fractions() -> None:
    assert parse_fractions("0.05:0.95:0.05") == list(DEFAULT_FRACTIONS)
    assert parse_fractions("0.05:0.95:0.2") == [0.05, 0.25, 0.45, 0.65, 0.85]
    assert parse_fractions("0.5, 0.1") == [0.5, 0.1]
    for bad in ("", "a:b:c", "0.5:0.1:0.1", "0.1:0.5:0", "0.1:0.5"):
        with pytest.raises(InputError):
            parse_fractions(bad)


def test_balanced_subset_covers_every_class() -> None:
    samples = [Sample(Path(f"{c}{i}.jpg"), c) for c in range(3) for i in range(5)]
    subset = balanced_subset(samples, 4)
    assert [s.label for s in subset] == [0, 0, 1, 2]
    assert [s.path.name for s in subset] == ["00.jpg", "01.jpg", "10.jpg", "20.jpg"]
    assert balanced_subset(samples, 100) == samples


# --------------------------------------------------------------------------- stages


def test_resumed_network_equals_the_whole_one(model: nn.Module, eval_set: EvalSet) -> None:
    stages = Stages(model, whole=["layer4"])
    assert "layer2.0" in stages.names  # blocks of layer1–3 are steps, layer4 stays whole
    assert "layer4" in stages.names
    assert stages.boundary(["layer2.0.conv1", "layer2.1.conv1"]) == stages.names.index("layer2.0")
    x = eval_set.inputs[:3]
    with torch.inference_mode():
        expected = model(x)
        for start in range(len(stages.steps) + 1):
            assert torch.equal(stages.resumed(start)(stages.prefix(x, start)), expected)


def test_networks_without_a_known_forward_run_whole() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).relu()

    class Rewired(ResNet):
        def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
            return super()._forward_impl(x) * 2

    assert len(Stages(Custom()).steps) == 1
    assert Stages(Custom()).boundary(["conv"]) == 0
    assert len(Stages(Rewired(block=BasicBlock, layers=[1, 1, 1, 1])).steps) == 1
    patched = build_model("resnet18", 2)
    setattr(patched, "forward", lambda x: x)  # noqa: B010  # an instance attribute
    assert len(Stages(patched).steps) == 1
    assert len(Stages(build_model("resnet18", 2)).steps) > 1


# --------------------------------------------------------------------------- tables


def test_mean_and_t_interval_on_known_numbers() -> None:
    estimate = mean_ci([1.0, 2.0, 3.0])
    # s = 1, t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 / math.sqrt(3)
    assert estimate.mean == pytest.approx(2.0)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((2 - half, 2 + half))
    assert estimate.n == 3
    wide = mean_ci([0.2, 0.4], confidence=0.9)  # t(0.95, 1) = 6.313751514675
    assert wide.ci_high == pytest.approx(0.3 + 6.313751514675 * math.sqrt(0.02) / math.sqrt(2))
    assert mean_ci([0.9, 1.0], bounds=(0.0, 1.0)).ci_high == 1.0  # clipped to the range
    assert mean_ci([5.0, None, math.nan]).model_dump() == {
        "mean": 5.0,
        "ci_low": None,
        "ci_high": None,
        "n": 1,
    }
    assert mean_ci([None]).mean is None
    with pytest.raises(InputError):
        mean_ci([1.0], confidence=1.0)


def test_tables_have_one_row_per_cell_and_per_level(
    model: nn.Module, eval_set: EvalSet, tmp_path: Path
) -> None:
    cfg = config(locations=["D1", "D3"], fractions=[0.2, 0.4, 0.6], trials=2)
    result = run_sweep(model, "resnet18", eval_set, cfg)
    report = result.report(CLASSES, checkpoint="tiny")
    paths = write_report(report, tmp_path)
    with paths["cells_csv"].open() as handle:
        cells = list(csv.DictReader(handle))
    with paths["summary_csv"].open() as handle:
        summary = list(csv.DictReader(handle))
    assert len(cells) == 2 * 3 * 2
    assert len({(r["location"], r["fraction"], r["trial"]) for r in cells}) == len(cells)
    assert len(summary) == 2 * 3
    assert {(r["location"], float(r["fraction"])) for r in summary} == {
        (loc, f) for loc in ("D1", "D3") for f in (0.2, 0.4, 0.6)
    }
    first = summary[0]
    trials = [
        float(r["accuracy"]) for r in cells if r["location"] == "D1" and r["fraction"] == "0.2"
    ]
    assert float(first["accuracy_mean"]) == pytest.approx(sum(trials) / 2)
    loaded = SweepReport.model_validate(json.loads(paths["json"].read_text()))
    assert loaded.rows == result.rows
    assert loaded.images == len(eval_set)
    assert loaded.provenance == {"checkpoint": "tiny"}
    assert 0.0 <= loaded.intact_accuracy <= 1.0
