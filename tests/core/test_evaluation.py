"""Evaluation: exact counts on a model whose outputs the test controls, and the cross-dataset
path (a UC Merced model on real AID images through the class mapping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from core.checkpoint_meta import CheckpointMeta, LineageStep
from core.datasets import ClassMapping, ImageDataset, ImageFolder
from core.evaluation import Evaluation, evaluate, folder_samples
from core.exceptions import CancelledError, DatasetError, InputError
from core.models import build_model
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.train_spec import TrainConfig
from core.transforms import eval_transform

CLASSES = ["a", "b", "c"]


class Logits(nn.Module):
    """Returns its input as the logits; remembers the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        return x


def _one_hot(predicted: int) -> Tensor:
    logits = torch.full((3,), -1.0)
    logits[predicted] = 2.0
    return logits


#: (true, predicted): class a right twice and wrong once, b right once and wrong once, no c.
CASES = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2)]
DATASET = [(_one_hot(p), t) for t, p in CASES]


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_counts_match_a_hand_computation(batch_size: int) -> None:
    model = Logits().train()
    result = evaluate(model, DATASET, classes=CLASSES, batch_size=batch_size, device="cpu")  # type: ignore[arg-type]

    assert result.count == 5
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.confusion_matrix == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]  # rows = truth
    assert result.per_class_accuracy == {"a": pytest.approx(2 / 3), "b": 0.5, "c": None}
    assert result.per_class_count == {"a": 3, "b": 2, "c": 0}
    logits = torch.stack([x for x, _ in DATASET])
    labels = torch.tensor([t for _, t in DATASET])
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    assert model.modes
    assert not any(model.modes)  # evaluated in eval mode ...
    assert model.training  # ... and the caller's train mode is back


def test_result_is_json() -> None:
    result = evaluate(Logits(), DATASET, classes=CLASSES, device="cpu")  # type: ignore[arg-type]
    data = json.loads(result.model_dump_json())
    assert data["per_class_accuracy"]["c"] is None
    assert Evaluation.model_validate(data) == result


def test_classes_default_to_the_datasets() -> None:
    class Named(list[tuple[Tensor, int]]):
        classes = CLASSES

    result = evaluate(Logits(), Named(DATASET), device="cpu")  # type: ignore[arg-type]
    assert result.classes == CLASSES


def test_progress_and_cancellation() -> None:
    reports: list[Progress] = []
    evaluate(Logits(), DATASET, classes=CLASSES, batch_size=2, progress=reports.append)  # type: ignore[arg-type]
    assert [p.metrics["images"] for p in reports] == [2, 4, 5]
    assert reports[-1].fraction == 1.0
    assert {p.stage for p in reports} == {"evaluate"}
    with pytest.raises(CancelledError):
        evaluate(Logits(), DATASET, classes=CLASSES, should_stop=lambda: True)  # type: ignore[arg-type]


def test_inconsistent_inputs_name_the_field() -> None:
    with pytest.raises(InputError) as info:
        evaluate(Logits(), DATASET, classes=["a", "b", "c", "d"])  # type: ignore[arg-type]
    assert info.value.field == "classes"
    with pytest.raises(DatasetError) as info:
        evaluate(Logits(), [(_one_hot(0), 3)], classes=CLASSES)  # type: ignore[arg-type]
    assert info.value.field == "dataset"
    with pytest.raises(DatasetError):
        evaluate(Logits(), [], classes=CLASSES)  # type: ignore[arg-type]
    with pytest.raises(InputError) as info:
        evaluate(Logits(), DATASET)  # type: ignore[arg-type]
    assert info.value.field == "classes"


def test_cross_dataset_evaluation_on_aid(aid_dir: Path, class_mapping_file: Path) -> None:
    mapping = ClassMapping.load(class_mapping_file)
    model_classes = [*sorted(mapping.ucm_to_aid), "intersection"]  # a UCM model's classes
    aid = ImageFolder.from_path(aid_dir, classes=["Port", "River", "Bridge"])
    aligned = mapping.align(aid, model_classes)  # Bridge is unseen by a UCM model: dropped

    torch.manual_seed(0)
    model = build_model("resnet18", len(model_classes))
    dataset = ImageDataset(aligned.samples, eval_transform(Preprocessing(input_size=32)))
    result = evaluate(model, dataset, classes=model_classes, batch_size=8, device="cpu")

    assert result.count == 16
    counts = {name: n for name, n in result.per_class_count.items() if n}
    assert counts == {"harbor": 8, "river": 8}
    assert result.per_class_accuracy["intersection"] is None
    assert len(result.confusion_matrix) == len(model_classes)
    assert sum(map(sum, result.confusion_matrix)) == 16
    correct = sum(result.confusion_matrix[i][i] for i in range(len(model_classes)))
    assert result.accuracy == pytest.approx(correct / 16)


def test_folder_samples_by_name_mapping_or_training_split(
    ucm_dir: Path, aid_dir: Path, class_mapping_file: Path
) -> None:
    mapping = ClassMapping.load(class_mapping_file)
    meta = CheckpointMeta(arch="resnet18", classes=["harbor", "river", "intersection"])

    by_name = folder_samples(meta, ucm_dir)  # the 18 other UCM classes are skipped
    assert sorted({s.label for s in by_name}) == [0, 1, 2]
    assert len(by_name) == 300
    assert len(folder_samples(meta, aid_dir, mapping=mapping)) == 16  # Port, River

    with pytest.raises(InputError) as no_split:
        folder_samples(meta, ucm_dir, split="test")  # no "train" step in the lineage
    assert no_split.value.field == "split"
    with pytest.raises(InputError) as mapped:
        folder_samples(meta, aid_dir, mapping=mapping, split="test")
    assert mapped.value.field == "mapping"

    config = TrainConfig(val_fraction=0.1, test_fraction=0.2, seed=5)
    step = LineageStep(op="train", params={"config": config.model_dump(mode="json")})
    trained = meta.model_copy(update={"lineage": [step]})
    test = folder_samples(trained, ucm_dir, split="test")
    assert len(test) == 60  # 20% of each class's 100 images
    assert {s.path.parent.name for s in test} == {"harbor", "river", "intersection"}
