"""Supervised training, fine-tuning and transfer learning of scene classifiers.

:func:`fit` is the one training loop: the plain recipe (SGD or AdamW, cosine or step schedule,
optional label smoothing and early stopping on validation accuracy), CUDA mixed precision, and
bit-exact reproducibility on the CPU for a given seed. Masked retraining after weight damage
(the paper's §3.2: "only the undamaged weights are updated during retraining") reuses it through
``step_guard``, which ``core.damage`` uses to hold the damaged weights at their fault values.

:func:`train_classifier` adds the data side: a dataset folder, a stratified split, the initial
weights (scratch, ImageNet, or a camres checkpoint with a new head for other classes — the
paper's transfer learning), and the checkpoint metadata of the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from core.checkpoint import Checkpoint, check_weights, load_checkpoint, save_checkpoint
from core.checkpoint_meta import CheckpointMeta, LineageStep
from core.datasets import ImageFolder, Split
from core.evaluation import (
    autocast_dtype,
    autocast_for,
    confusion_matrix,
    evaluate,
    resolve_device,
)
from core.exceptions import CheckpointError, DatasetError, InputError
from core.hooks import preserved_mode
from core.models import build_model, get_arch
from core.preprocessing import Preprocessing
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.train_spec import (
    CheckpointInit,
    EpochStats,
    Evaluation,
    ImageNetInit,
    PrecisionName,
    TrainConfig,
    TrainResult,
)
from core.training_data import DataSplits, LabelledDataset, load_splits

__all__ = [
    "StepGuard",
    "TrainedModel",
    "build_optimizer",
    "build_scheduler",
    "fit",
    "train_classifier",
]

#: Wraps the optimizer for the whole training loop (entered once the optimizer exists, exited
#: when training ends or fails); ``core.damage.hold_damage`` is the guard of masked retraining.
StepGuard = Callable[[torch.optim.Optimizer], AbstractContextManager[object]]

#: Minimum seconds between two step-level progress reports (epoch ends are always reported): a
#: worker relays each report to its job store, so per-step calls would flood it.
PROGRESS_INTERVAL_S = 0.5


# --------------------------------------------------------------------------- optimization


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters", field="model")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: cosine annealing to 0 over ``config.epochs`` (Loshchilov
    & Hutter, SGDR, without restarts), step decay, or constant."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_size, gamma=config.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (model init, dropout, augmentation without a generator) inside
    the block and give the caller back the RNG state it had, so training has no side effect on
    the caller's random stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Reporter:
    """Relays training progress, at most every :data:`PROGRESS_INTERVAL_S` within an epoch."""

    def __init__(self, callback: ProgressCallback | None, epochs: int, steps: int) -> None:
        self.callback = callback
        self.epochs = epochs
        self.steps = steps
        self._last = -math.inf

    def step(self, epoch: int, step: int, loss: Tensor, correct: Tensor, seen: int) -> None:
        now = time.monotonic()
        if self.callback is None or now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        metrics = {"loss": float(loss) / seen, "accuracy": float(correct) / seen}
        self._send(epoch, step, metrics, f"epoch {epoch}/{self.epochs}")

    def epoch_end(self, stats: EpochStats) -> None:
        metrics = {
            "loss": stats.train_loss,
            "accuracy": stats.train_accuracy,
            "val_loss": stats.val_loss,
            "val_accuracy": stats.val_accuracy,
            "lr": stats.lr,
        }
        val = "" if stats.val_accuracy is None else f", val acc {stats.val_accuracy:.3f}"
        message = f"epoch {stats.epoch}/{self.epochs}: loss {stats.train_loss:.4f}{val}"
        self._send(stats.epoch, self.steps, metrics, message)

    def _send(self, epoch: int, step: int, metrics: dict[str, Any], message: str) -> None:
        fraction = min(1.0, (epoch - 1 + step / self.steps) / self.epochs)
        base = {"epoch": epoch, "epochs": self.epochs, "step": step, "steps": self.steps}
        report(self.callback, Progress(fraction, "train", message, {**base, **metrics}))


@dataclass
class _Loop:
    """Everything one epoch needs; built once per :func:`fit` call."""

    model: nn.Module
    loader: DataLoader[tuple[Tensor, int]]
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    precision: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    reporter: _Reporter
    should_stop: ShouldStop | None

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training set; mean loss and accuracy over its batches."""
        self.model.train()
        # Running sums stay on the device: no host sync per step on a GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        for step, (images, labels) in enumerate(self.loader, 1):
            check_stop(self.should_stop, "training")
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.precision):
                logits = self.model(images)
                loss = self.criterion(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # float16: scale the loss so small gradients survive
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += len(labels)
            self.reporter.step(epoch, step, loss_sum, correct, seen)
        mean_loss = float(loss_sum) / seen
        if not math.isfinite(mean_loss):
            raise InputError(
                f"training diverged in epoch {epoch} (loss {mean_loss}); lower the learning rate",
                field="lr",
            )
        return mean_loss, float(correct) / seen


def _loader(
    dataset: LabelledDataset,
    config: TrainConfig,
    device: torch.device,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> DataLoader[tuple[Tensor, int]]:
    size = len(dataset)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        generator=generator,
        # A last batch of one image breaks BatchNorm in train mode ("Expected more than 1 value
        # per channel"): drop it rather than fail an epoch.
        drop_last=shuffle and size > config.batch_size and size % config.batch_size == 1,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def _check_datasets(
    train_ds: LabelledDataset, val_ds: LabelledDataset | None, config: TrainConfig
) -> None:
    if len(train_ds) == 0:  # type: ignore[arg-type]
        raise DatasetError("the training set is empty", field="train_ds")
    if val_ds is not None and len(val_ds) == 0:  # type: ignore[arg-type]
        raise DatasetError("the validation set is empty; pass None for none", field="val_ds")
    if config.patience is not None and val_ds is None:
        raise DatasetError("early stopping (patience) needs a validation set", field="val_ds")


def fit(
    model: nn.Module,
    train_ds: LabelledDataset,
    val_ds: LabelledDataset | None,
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
    step_guard: StepGuard | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_ds``, validating on ``val_ds`` after every epoch.

    The model is moved to ``config.device`` and stays there; its train/eval flags are restored
    when training ends. With ``config.patience`` training stops after that many epochs without
    a better validation accuracy, and the weights of the best epoch are restored. Seeded from
    ``config.seed`` (shuffling, augmentation drawn from torch's global RNG, dropout) inside a
    forked RNG: two CPU runs with the same seed, model and data give bit-identical weights.
    ``step_guard(optimizer)`` is entered around the whole loop. ``should_stop`` is polled before
    every step (:class:`~core.exceptions.CancelledError`).
    """
    _check_datasets(train_ds, val_ds, config)
    device = resolve_device(config.device)
    precision = autocast_dtype(device, config.amp)
    started = time.perf_counter()
    with _seeded(config.seed, device), preserved_mode(model):
        model.to(device)
        generator = torch.Generator().manual_seed(config.seed)
        loader = _loader(train_ds, config, device, shuffle=True, generator=generator)
        val_loader = None if val_ds is None else _loader(val_ds, config, device, shuffle=False)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        loop = _Loop(
            model=model,
            loader=loader,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
            device=device,
            precision=precision,
            scaler=torch.amp.GradScaler(device.type) if precision == torch.float16 else None,
            reporter=_Reporter(progress, config.epochs, len(loader)),
            should_stop=should_stop,
        )
        with step_guard(optimizer) if step_guard is not None else nullcontext():
            history, best, best_state = _run_epochs(loop, scheduler, val_loader, config)
            restored = best_state is not None and best.epoch != history[-1].epoch
            if restored:
                model.load_state_dict(best_state)  # type: ignore[arg-type]
    return TrainResult(
        history=history,
        best_epoch=best.epoch,
        best_val_accuracy=best.val_accuracy,
        stopped_early=len(history) < config.epochs,
        restored_best=restored,
        device=str(device),
        precision=_precision_name(precision),
        seconds=time.perf_counter() - started,
    )


def _run_epochs(
    loop: _Loop,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    val_loader: DataLoader[tuple[Tensor, int]] | None,
    config: TrainConfig,
) -> tuple[list[EpochStats], EpochStats, dict[str, Tensor] | None]:
    """The epochs of :func:`fit`: history, best epoch, and (with early stopping) a CPU copy of
    the best epoch's state."""
    history: list[EpochStats] = []
    best: EpochStats | None = None
    best_state: dict[str, Tensor] | None = None
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        lr = float(loop.optimizer.param_groups[0]["lr"])
        train_loss, train_accuracy = loop.train_epoch(epoch)
        scheduler.step()
        val_loss, val_accuracy = _validate(loop, val_loader)
        stats = EpochStats(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=lr,
            seconds=time.perf_counter() - began,
        )
        history.append(stats)
        loop.reporter.epoch_end(stats)
        if best is None or _better(stats, best):
            best = stats
            if config.patience is not None:
                best_state = _cpu_copy(loop.model.state_dict())
        elif config.patience is not None and epoch - best.epoch >= config.patience:
            break
    assert best is not None  # epochs >= 1
    return history, best, best_state


def _better(stats: EpochStats, best: EpochStats) -> bool:
    if stats.val_accuracy is None or best.val_accuracy is None:
        return True  # without validation the latest epoch is the best one
    return stats.val_accuracy > best.val_accuracy


def _validate(
    loop: _Loop, val_loader: DataLoader[tuple[Tensor, int]] | None
) -> tuple[float | None, float | None]:
    if val_loader is None:
        return None, None
    confusion, loss_sum = confusion_matrix(
        loop.model,
        val_loader,
        device=loop.device,
        precision=loop.precision,
        should_stop=loop.should_stop,
    )
    count = int(confusion.sum())
    return loss_sum / count, float(confusion.diagonal().sum()) / count


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}


def _precision_name(dtype: torch.dtype | None) -> PrecisionName:
    if dtype == torch.float16:
        return "float16"
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


# --------------------------------------------------------------------------- classifiers


@dataclass
class TrainedModel:
    """A trained classifier: the model (eval-ready), its checkpoint metadata, how training went,
    its test-set evaluation (None without a test split) and the split it was trained on."""

    model: nn.Module
    meta: CheckpointMeta
    result: TrainResult
    evaluation: Evaluation | None
    split: Split

    def save(self, path: str | Path) -> str:
        """Write the checkpoint; returns its digest."""
        return save_checkpoint(path, self.model, self.meta)


def train_classifier(
    dataset_root: str | Path,
    arch: str | None,
    config: TrainConfig,
    *,
    classes: Sequence[str] | None = None,
    cache: bool | None = None,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> TrainedModel:
    """Train ``arch`` on the image folder ``dataset_root`` (only ``classes``, in that order,
    when given) from ``config.init``, and evaluate it on the held-out test split.

    Transfer learning (the paper's §4.1): from ImageNet weights or from a camres checkpoint
    whose classes differ, the backbone is kept and the head gets one output per dataset class;
    rows of classes the checkpoint already knows (by name) are carried over. ``arch`` may be None
    when starting from a checkpoint (its architecture is used); the checkpoint's preprocessing is
    kept unless ``config.input_size`` is set.
    """
    parent = _load_parent(config)
    arch = _resolve_arch(arch, parent)
    folder = ImageFolder.from_path(dataset_root, classes=classes)
    pre = _preprocessing(parent.meta if parent else None, config)
    report(progress, Progress(0.0, "load", f"loading {len(folder.samples)} images"))
    data = load_splits(
        folder,
        pre,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        cache=cache,
        should_stop=should_stop,
    )
    with _seeded(config.seed, torch.device("cpu")):  # reproducible head/backbone initialization
        model = _initial_model(arch, folder.classes, config, parent)
    result = fit(
        model,
        data.train,
        data.val,
        config,
        progress=_scaled(progress, 0.0, 0.95),
        should_stop=should_stop,
    )
    evaluation = None
    if data.test is not None:
        evaluation = evaluate(
            model,
            data.test,
            classes=folder.classes,
            batch_size=config.batch_size,
            device=config.device,
            progress=_scaled(progress, 0.95, 1.0),
            should_stop=should_stop,
        )
    meta = _trained_meta(arch, pre, data, config, result, evaluation, parent)
    model.eval()
    return TrainedModel(model, meta, result, evaluation, data.split)


def _load_parent(config: TrainConfig) -> Checkpoint | None:
    if not isinstance(config.init, CheckpointInit):
        return None
    parent = load_checkpoint(config.init.checkpoint)
    check_weights(parent.meta.arch, len(parent.meta.classes), parent.state_dict)
    return parent


def _resolve_arch(arch: str | None, parent: Checkpoint | None) -> str:
    if parent is None:
        if arch is None:
            raise InputError("an architecture is needed to train from scratch", field="arch")
        get_arch(arch)  # UnknownArchitectureError before any image is read
        return arch
    if arch is not None and arch != parent.meta.arch:
        raise CheckpointError(
            f"the init checkpoint is a {parent.meta.arch}, not a {arch}", field="init"
        )
    return parent.meta.arch


def _preprocessing(parent: CheckpointMeta | None, config: TrainConfig) -> Preprocessing:
    pre = parent.preprocessing if parent is not None else Preprocessing()
    if config.input_size is None:
        return pre
    return pre.model_copy(update={"input_size": config.input_size})


def _initial_model(
    arch: str, classes: list[str], config: TrainConfig, parent: Checkpoint | None
) -> nn.Module:
    if parent is None:
        pretrained = isinstance(config.init, ImageNetInit)
        return build_model(arch, len(classes), pretrained=pretrained)
    model = build_model(arch, len(classes))
    _transfer(model, get_arch(arch).logits_layer, parent.state_dict, parent.meta.classes, classes)
    return model


def _transfer(
    model: nn.Module,
    head: str,
    state: dict[str, Tensor],
    source_classes: Sequence[str],
    classes: Sequence[str],
) -> None:
    """Load a checkpoint's weights into ``model``, whose head scores ``classes``: the backbone
    as is, and for the head the rows of the classes the checkpoint knows by name (the other rows
    keep their fresh initialization)."""
    head_keys = {f"{head}.weight", f"{head}.bias"}
    model.load_state_dict({k: v for k, v in state.items() if k not in head_keys}, strict=False)
    layer = model.get_submodule(head)
    index = {name: i for i, name in enumerate(source_classes)}
    shared = [(j, index[name]) for j, name in enumerate(classes) if name in index]
    if not shared or not isinstance(layer, nn.Linear):
        return
    rows = torch.tensor([j for j, _ in shared])
    source_rows = torch.tensor([i for _, i in shared])
    with torch.no_grad():
        for key, param in ((f"{head}.weight", layer.weight), (f"{head}.bias", layer.bias)):
            if param is not None and key in state:
                param[rows] = state[key][source_rows].to(param.dtype)


def _trained_meta(
    arch: str,
    pre: Preprocessing,
    data: DataSplits,
    config: TrainConfig,
    result: TrainResult,
    evaluation: Evaluation | None,
    parent: Checkpoint | None,
) -> CheckpointMeta:
    split = data.split
    provenance = {
        "dataset": {
            "root": str(data.folder.root),
            "layout": data.folder.layout,
            "images": len(data.folder.samples),
        },
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "test_accuracy": None if evaluation is None else evaluation.accuracy,
        "device": result.device,
    }
    step = LineageStep(
        op="train",
        parent_digest=None if parent is None else parent.digest,
        params={"config": config.model_dump(mode="json"), "dataset": str(data.folder.root)},
    )
    return CheckpointMeta(
        arch=arch,
        classes=list(data.folder.classes),
        preprocessing=pre,
        provenance=provenance,
        lineage=[*(parent.meta.lineage if parent else []), step],
    )


def _scaled(callback: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    """``callback`` with fractions mapped from [0, 1] into [start, end] of the whole job."""
    if callback is None:
        return None

    def relay(p: Progress) -> None:
        callback(Progress(start + (end - start) * p.fraction, p.stage, p.message, p.metrics))

    return relay
