"""Accuracy, per-class accuracy and confusion matrix of a classifier on a labelled dataset.

The dataset yields ``(image tensor, label)`` with labels indexing the *model's* classes. For a
cross-dataset evaluation (a UC Merced model on AID, the paper's Figure 3) the folder is first
relabelled into the model's class space with :meth:`core.datasets.ClassMapping.align`, which
drops the classes the model never saw; then one code path serves both cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from core.checkpoint_meta import CheckpointMeta
from core.datasets import ClassMapping, ImageDataset, ImageFolder, Sample, stratified_split
from core.exceptions import DatasetError, InputError
from core.hooks import eval_mode
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.train_spec import Evaluation
from core.training_data import training_split
from core.transforms import eval_transform

__all__ = [
    "Evaluation",
    "autocast_dtype",
    "autocast_for",
    "confusion_matrix",
    "evaluate",
    "evaluate_folder",
    "evaluation_from_confusion",
    "folder_samples",
    "resolve_device",
]

LabelledBatches = Iterable[tuple[Tensor, Tensor]]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / None → CUDA when present, else CPU; asking for CUDA without it is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}", field="device") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available", field="device")
    return resolved


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed-precision compute type on ``device``: bfloat16 where the GPU supports it (no loss
    scaling needed), else float16; None (full precision) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for full precision."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def confusion_matrix(
    model: nn.Module,
    batches: LabelledBatches,
    num_classes: int | None = None,
    *,
    device: torch.device,
    precision: torch.dtype | None = None,
    should_stop: ShouldStop | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Tensor, float]:
    """Counts (true × predicted, int64 on the CPU) and the summed cross-entropy of ``model`` over
    ``batches``. ``num_classes`` defaults to the model's number of outputs. Runs in eval mode
    without gradients; the model's mode is restored after. ``on_batch`` receives the number of
    images seen so far."""
    counts: Tensor | None = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    with eval_mode(model), torch.inference_mode():
        for images, labels in batches:
            check_stop(should_stop, "evaluation")
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast_for(device, precision):
                logits = model(images)
            num_classes = num_classes or logits.shape[-1]
            if logits.shape[-1] != num_classes:
                raise InputError(
                    f"the model scores {logits.shape[-1]} classes, expected {num_classes}",
                    field="classes",
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise DatasetError(
                    f"labels must lie in [0, {num_classes}); relabel the samples into the "
                    "model's classes first",
                    field="dataset",
                )
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            # One bincount over flattened (true, predicted) pairs fills the whole matrix.
            pairs = torch.bincount(
                labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2
            )
            counts = pairs if counts is None else counts + pairs
            seen += len(labels)
            if on_batch is not None:
                on_batch(seen)
    if counts is None or num_classes is None:
        raise DatasetError("nothing to evaluate: the dataset is empty", field="dataset")
    return counts.view(num_classes, num_classes).cpu(), float(loss_sum)


def evaluation_from_confusion(
    classes: Sequence[str], confusion: Tensor, loss_sum: float | None = None
) -> Evaluation:
    """Build the JSON result from a confusion matrix (rows = true class)."""
    per_class = confusion.sum(dim=1)
    correct = confusion.diagonal()
    count = int(per_class.sum())
    if count == 0:
        raise DatasetError("nothing to evaluate: the dataset is empty", field="dataset")
    return Evaluation(
        classes=list(classes),
        count=count,
        accuracy=float(correct.sum()) / count,
        per_class_accuracy={
            name: (float(correct[i]) / int(per_class[i]) if per_class[i] else None)
            for i, name in enumerate(classes)
        },
        per_class_count={name: int(per_class[i]) for i, name in enumerate(classes)},
        confusion_matrix=confusion.tolist(),
        loss=None if loss_sum is None else loss_sum / count,
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset[tuple[Tensor, int]],
    *,
    classes: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> Evaluation:
    """Accuracy, per-class accuracy and confusion matrix of ``model`` on ``dataset``.

    ``classes`` names the model's outputs (default: ``dataset.classes``). The model is moved to
    ``device`` (default: CUDA when present) and left there; its train/eval mode is restored.
    """
    names = _class_names(dataset, classes)
    if batch_size < 1:
        raise InputError("batch_size must be at least 1", field="batch_size")
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DatasetError("nothing to evaluate: the dataset is empty", field="dataset")
    target = resolve_device(device)
    model.to(target)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=target.type == "cuda",
    )

    def on_batch(seen: int) -> None:
        report(
            progress,
            Progress(seen / total, "evaluate", f"{seen}/{total} images", {"images": seen}),
        )

    confusion, loss_sum = confusion_matrix(
        model, loader, len(names), device=target, should_stop=should_stop, on_batch=on_batch
    )
    return evaluation_from_confusion(names, confusion, loss_sum)


def evaluate_folder(
    model: nn.Module,
    meta: CheckpointMeta,
    root: str | Path,
    *,
    mapping: ClassMapping | None = None,
    split: Literal["all", "test"] = "all",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> Evaluation:
    """:func:`evaluate` a checkpoint's model on the image folder ``root``, with the checkpoint's
    preprocessing; see :func:`folder_samples` for which images are used."""
    samples = folder_samples(meta, root, mapping=mapping, split=split)
    return evaluate(
        model,
        ImageDataset(samples, eval_transform(meta.preprocessing)),
        classes=meta.classes,
        batch_size=batch_size,
        device=device,
        progress=progress,
        should_stop=should_stop,
    )


def folder_samples(
    meta: CheckpointMeta,
    root: str | Path,
    *,
    mapping: ClassMapping | None = None,
    split: Literal["all", "test"] = "all",
) -> list[Sample]:
    """The images of ``root`` to evaluate a checkpoint on, labelled in its class order.

    ``split="all"``: every image of a class the model knows — by name, or through ``mapping``
    for a dataset that names classes differently (AID for a UC Merced model); the other classes
    are skipped. ``split="test"``: the test images of the checkpoint's training split (recorded
    in its lineage), when ``root`` is the dataset it was trained on.
    """
    if split == "all":
        table = mapping if mapping is not None else ClassMapping(ucm_to_aid={})
        return table.align(ImageFolder.from_path(root), meta.classes).samples
    if mapping is not None:
        raise InputError(
            "the test split is one of the training dataset: no mapping", field="mapping"
        )
    recorded = training_split(meta)
    if recorded is None:
        raise InputError("the checkpoint records no training split", field="split")
    folder = ImageFolder.from_path(root, classes=meta.classes)
    return stratified_split(
        folder.samples, recorded.val_fraction, recorded.test_fraction, recorded.seed
    ).test


def _class_names(dataset: object, classes: Sequence[str] | None) -> list[str]:
    names = classes if classes is not None else getattr(dataset, "classes", None)
    if names is None:
        raise InputError(
            "class names are needed: pass classes= or a dataset with .classes", field="classes"
        )
    if len(names) < 1 or len(set(names)) != len(names):
        raise InputError("classes must be distinct names", field="classes")
    return list(names)
