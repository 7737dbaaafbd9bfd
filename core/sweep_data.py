"""The images a damage sweep evaluates and the images masked retraining learns from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.datasets import Sample
from core.exceptions import DatasetError, InputError
from core.progress import ShouldStop, check_stop
from core.training_data import LabelledDataset

__all__ = ["EvalSet", "RetrainData", "balanced_subset"]


@dataclass(frozen=True)
class EvalSet:
    """Preprocessed evaluation images (N, 3, H, W) float32 and their labels (N,) int64, held in
    memory (0.6 MB per image at 224 px) because a sweep reads them once per location."""

    inputs: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4 or self.labels.shape != (self.inputs.shape[0],):
            raise InputError(
                f"expected inputs N×C×H×W and N labels, got {tuple(self.inputs.shape)} and "
                f"{tuple(self.labels.shape)}",
                field="eval_set",
            )
        if self.inputs.shape[0] == 0:
            raise DatasetError("the evaluation set is empty", field="eval_set")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @classmethod
    def from_dataset(
        cls, dataset: LabelledDataset, *, should_stop: ShouldStop | None = None
    ) -> EvalSet:
        """Decode and transform every item of ``dataset`` once."""
        inputs, labels = [], []
        for index in range(len(dataset)):  # type: ignore[arg-type]
            check_stop(should_stop, "image loading")
            image, label = dataset[index]
            inputs.append(image)
            labels.append(int(label))
        if not inputs:
            raise DatasetError("the evaluation set is empty", field="dataset")
        return cls(torch.stack(inputs).contiguous(), torch.tensor(labels, dtype=torch.long))


def balanced_subset(samples: Sequence[Sample], limit: int) -> list[Sample]:
    """At most ``limit`` samples, taken round-robin over the classes (each class in its given
    order), so a small subset still covers every class; the result keeps the input order."""
    if limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}", field="limit")
    # Rank each sample within its class; taking the lowest ranks first is a round-robin.
    seen: dict[int, int] = {}
    ranked = []
    for index, sample in enumerate(samples):
        rank = seen.get(sample.label, 0)
        seen[sample.label] = rank + 1
        ranked.append((rank, sample.label, index))
    chosen = [index for _, _, index in sorted(ranked)[:limit]]
    return [samples[i] for i in sorted(chosen)]


@dataclass(frozen=True)
class RetrainData:
    """Images for masked retraining: a training set and an optional validation set."""

    train: LabelledDataset
    val: LabelledDataset | None = None
