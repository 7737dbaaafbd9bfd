"""``camres train``, ``damage``, ``retrain`` and ``evaluate``: the model lifecycle of the paper on
this machine — train (or fine-tune) a classifier, damage its weights (§3.2), retrain the
undamaged weights, and measure accuracy on the way.

Long steps draw a tqdm progress bar (on a terminal) from the :class:`core.progress.Progress`
reports of ``core``. Invalid option values become a usage error naming the option; everything
else ``core`` refuses is a :class:`core.exceptions.CamresError` that ``cli.main`` prints.
torch is imported only inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel

from cli.params import CHECKPOINT, FOLDER, OUTPUT, echo_json, percent, progress_bar, validated
from core.damage_spec import BitFlip, DamageSpec, Gaussian, StuckAt
from core.exceptions import CheckpointError, DatasetError
from core.progress import Progress
from core.train_spec import (
    CheckpointInit,
    Evaluation,
    ImageNetInit,
    OptimizerName,
    ScheduleName,
    ScratchInit,
    TrainConfig,
)

if TYPE_CHECKING:
    pass

__all__ = ["damage", "evaluate", "retrain", "train"]

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


#: Option defaults come from the configuration model, so the CLI cannot drift from the API.
DEFAULTS = TrainConfig()


# --------------------------------------------------------------------------- shared pieces


def _training_options(epochs: int, lr: float) -> Callable[[F], F]:
    """The hyper-parameter options ``train`` and ``retrain`` share (defaults differ)."""
    options = [
        click.option("--epochs", type=int, default=epochs, show_default=True),
        click.option("--lr", type=float, default=lr, show_default=True, help="Learning rate."),
        click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True),
        click.option(
            "--optimizer",
            type=click.Choice(typing.get_args(OptimizerName)),
            default=DEFAULTS.optimizer,
            show_default=True,
        ),
        click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True),
        click.option(
            "--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True
        ),
        click.option(
            "--schedule",
            type=click.Choice(typing.get_args(ScheduleName)),
            default=DEFAULTS.schedule,
            show_default=True,
        ),
        click.option(
            "--patience", type=int, default=None, help="Early stopping on validation accuracy."
        ),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--workers", "num_workers", type=int, default=0, show_default=True),
        click.option("--amp/--no-amp", default=True, help="Mixed precision on CUDA."),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _metrics(progress: Progress) -> str:
    """The bar's postfix: epoch and the latest loss / accuracies."""
    metrics = progress.metrics
    shown = []
    if "epoch" in metrics:
        shown.append(f"epoch {metrics['epoch']}/{metrics.get('epochs', '?')}")
    for key in ("loss", "accuracy", "val_accuracy"):
        value = metrics.get(key)
        if isinstance(value, float):
            shown.append(f"{key} {value:.3f}")
    return ", ".join(shown)


# --------------------------------------------------------------------------- train


@click.command("train")
@click.argument("dataset", type=FOLDER)
@click.option(
    "--arch",
    default=None,
    help="Architecture [default: resnet18; with a checkpoint --init, the checkpoint's].",
)
@click.option("--classes", default=None, help="Comma-separated class folders to use, in order.")
@click.option(
    "--classes-from",
    type=CHECKPOINT,
    default=None,
    help="Use the classes shared by UC Merced and AID from this mapping JSON "
    "(ucm_aid_classes.json), named as in DATASET.",
)
@click.option(
    "--init",
    default="scratch",
    show_default=True,
    help="scratch, imagenet, or a camres checkpoint to fine-tune (transfer learning).",
)
@click.option(
    "--input-size",
    type=int,
    default=None,
    help="Input side in px [default: 224, or the init checkpoint's].",
)
@click.option("--val-fraction", type=float, default=DEFAULTS.val_fraction, show_default=True)
@click.option("--test-fraction", type=float, default=DEFAULTS.test_fraction, show_default=True)
@_training_options(epochs=DEFAULTS.epochs, lr=DEFAULTS.lr)
@click.option("--out", required=True, type=OUTPUT, help="Checkpoint to write (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(
    dataset: Path,
    arch: str | None,
    classes: str | None,
    classes_from: Path | None,
    init: str,
    out: Path,
    as_json: bool,
    **settings: Any,
) -> None:
    """Train a classifier on the image folder DATASET (one sub-folder per class, or the UC
    Merced archive layout) and evaluate it on a held-out stratified test split."""
    config = validated(TrainConfig, {"init": "--init"}, init=_init(init), **settings)
    if arch is None and not isinstance(config.init, CheckpointInit):
        arch = "resnet18"
    class_list = _class_list(dataset, classes, classes_from)

    from core.training import train_classifier

    with progress_bar("train", _metrics) as progress:
        trained = train_classifier(dataset, arch, config, classes=class_list, progress=progress)
    digest = trained.save(out)
    if as_json:
        echo_json(
            {
                "checkpoint": str(out),
                "digest": digest,
                "meta": trained.meta.model_dump(mode="json"),
                "result": trained.result.model_dump(mode="json"),
                "evaluation": _dump(trained.evaluation),
            }
        )
        return
    result = trained.result
    last = result.history[-1]
    click.echo(
        f"trained {trained.meta.arch} on {len(trained.meta.classes)} classes for "
        f"{result.epochs_run} epochs in {result.seconds:.0f} s on {result.device} "
        f"(train loss {last.train_loss:.4f}, best epoch {result.best_epoch}, "
        f"val accuracy {percent(result.best_val_accuracy).strip()})"
    )
    if trained.evaluation is not None:
        click.echo(
            f"test accuracy {percent(trained.evaluation.accuracy).strip()} "
            f"on {trained.evaluation.count} images"
        )
    click.echo(f"wrote {out} ({digest})")


def _init(value: str) -> ScratchInit | ImageNetInit | CheckpointInit:
    if value == "scratch":
        return ScratchInit()
    if value == "imagenet":
        return ImageNetInit()
    if not Path(value).is_file():
        raise click.BadParameter(
            "expected scratch, imagenet or an existing checkpoint file", param_hint="--init"
        )
    return CheckpointInit(checkpoint=value)


def _class_list(dataset: Path, classes: str | None, classes_from: Path | None) -> list[str] | None:
    if classes is not None and classes_from is not None:
        raise click.UsageError("give --classes or --classes-from, not both")
    if classes is not None:
        names = [name.strip() for name in classes.split(",") if name.strip()]
        if not names:
            raise click.BadParameter("no class names given", param_hint="--classes")
        return names
    if classes_from is None:
        return None
    from core.datasets import ClassMapping, ImageFolder

    mapping = ClassMapping.load(classes_from)
    available = set(ImageFolder.from_path(dataset).classes)
    ucm = sorted(mapping.ucm_to_aid)
    # The AID names follow the UCM order, so class index i means the same scene in both.
    for names in (ucm, [mapping.ucm_to_aid[name] for name in ucm]):
        if available.issuperset(names):
            return names
    raise DatasetError(
        f"{dataset} has neither the UC Merced nor the AID names of the mapped classes",
        field="classes_from",
    )


def _dump(model: BaseModel | None) -> Any:
    return None if model is None else model.model_dump(mode="json")


# --------------------------------------------------------------------------- damage


@click.command("damage")
@click.argument("checkpoint", type=CHECKPOINT)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="D1–D4 (the first convolution of every block of ResNet stage 1–4), a module name or "
    "a glob; repeatable [default: D1 D2 D3 D4].",
)
@click.option("--fraction", type=float, required=True, help="Share of each layer's weights.")
@click.option(
    "--fault",
    type=click.Choice(["stuck_at", "bit_flip", "gaussian"]),
    default="stuck_at",
    show_default=True,
)
@click.option("--value", type=float, default=0.0, show_default=True, help="stuck_at value.")
@click.option("--bit", "bits", type=int, multiple=True, help="bit_flip: allowed bit (repeat).")
@click.option("--sigma", type=float, default=1.0, show_default=True, help="gaussian: σ.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=OUTPUT, help="Damaged checkpoint to write.")
def damage(
    checkpoint: Path,
    targets: tuple[str, ...],
    fraction: float,
    fault: str,
    value: float,
    bits: tuple[int, ...],
    sigma: float,
    seed: int,
    out: Path,
) -> None:
    """Damage the weights of CHECKPOINT permanently and save the result with its masks."""
    fault_spec = {
        "stuck_at": lambda: validated(StuckAt, {}, value=value),
        "bit_flip": lambda: validated(BitFlip, {"bits": "--bit"}, bits=list(bits) or None),
        "gaussian": lambda: validated(Gaussian, {}, sigma=sigma),
    }[fault]()
    spec = validated(
        DamageSpec,
        {"targets": "--target"},
        targets=list(targets) or None,
        fraction=fraction,
        fault=fault_spec,
        seed=seed,
    )

    from core.checkpoint import load_checkpoint
    from core.damage import damage_checkpoint

    digest = damage_checkpoint(checkpoint, spec, out)
    masks = load_checkpoint(out).damage_masks
    damaged = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    click.echo(
        f"damaged {damaged} of {total} weights in {len(masks)} layers "
        f"({spec.fault.kind}, targets {' '.join(spec.targets)})"
    )
    click.echo(f"wrote {out} ({digest})")


# --------------------------------------------------------------------------- retrain


@click.command("retrain")
@click.argument("checkpoint", type=CHECKPOINT)
@click.argument("dataset", type=FOLDER)
@_training_options(epochs=3, lr=0.01)
@click.option("--out", required=True, type=OUTPUT, help="Retrained checkpoint to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def retrain(checkpoint: Path, dataset: Path, out: Path, as_json: bool, **settings: Any) -> None:
    """Masked retraining of the damaged CHECKPOINT on DATASET: only the undamaged weights
    learn, every damaged weight keeps its fault value (checked bit for bit).

    The images are split as the checkpoint's training split was (recorded in its lineage), so
    the reported test accuracy is on images the model never trained on.
    """
    from core.resilience import retrain_checkpoint

    config = validated(TrainConfig, {}, **settings)
    with progress_bar("retrain", _metrics) as progress:
        try:
            outcome = retrain_checkpoint(checkpoint, dataset, config, out, progress=progress)
        except CheckpointError as exc:  # the command's only checkpoint is CHECKPOINT
            raise CheckpointError(exc.message, field="checkpoint") from None
    check, before, after = outcome.damage_check, outcome.before, outcome.after
    if as_json:
        echo_json(
            {
                "checkpoint": str(out),
                "digest": outcome.digest,
                "result": outcome.result.model_dump(mode="json"),
                "damage_check": check,
                "before": _dump(before),
                "after": _dump(after),
            }
        )
        return
    if before is not None and after is not None:
        click.echo(
            f"accuracy on {after.count} held-out images: {percent(before.accuracy).strip()} "
            f"damaged → {percent(after.accuracy).strip()} after "
            f"{outcome.result.epochs_run} epoch(s)"
        )
    click.echo(
        f"{check['damaged']} damaged weights, {check['mismatched']} moved from their "
        f"fault value ({'ok' if check['ok'] else 'VIOLATED'})"
    )
    click.echo(f"wrote {out} ({outcome.digest})")


# --------------------------------------------------------------------------- evaluate


@click.command("evaluate")
@click.argument("checkpoint", type=CHECKPOINT)
@click.argument("dataset", type=FOLDER)
@click.option(
    "--mapping",
    type=CHECKPOINT,
    default=None,
    help="Class mapping JSON (ucm_aid_classes.json) for a dataset that names classes "
    "differently, e.g. AID images for a UC Merced model; unmapped classes are skipped.",
)
@click.option(
    "--split",
    type=click.Choice(["all", "test"]),
    default="all",
    show_default=True,
    help="test: only the images the checkpoint's training held out (DATASET must be the "
    "training dataset).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
def evaluate(
    checkpoint: Path,
    dataset: Path,
    mapping: Path | None,
    split: str,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix of CHECKPOINT on DATASET."""
    from core.checkpoint import load_model
    from core.datasets import ClassMapping
    from core.evaluation import evaluate_folder

    model, ckpt = load_model(checkpoint)
    table = ClassMapping.load(mapping) if mapping is not None else None
    with progress_bar("evaluate", _metrics) as progress:
        result = evaluate_folder(
            model,
            ckpt.meta,
            dataset,
            mapping=table,
            split="test" if split == "test" else "all",
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    if as_json:
        echo_json(result.model_dump(mode="json"))
    else:
        click.echo(_report(result))


def _report(result: Evaluation) -> str:
    """Accuracy, a per-class table and the confusion matrix (rows = true class)."""
    width = max(len(name) for name in result.classes)
    lines = [f"accuracy {percent(result.accuracy).strip()} on {result.count} images", ""]
    lines.append(f"{'class':<{width}}  images  accuracy")
    for name in result.classes:
        accuracy = result.per_class_accuracy[name]
        lines.append(f"{name:<{width}}  {result.per_class_count[name]:6d}  {percent(accuracy)}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted, in the order above)"]
    cell = max(3, len(str(max(max(row) for row in result.confusion_matrix))))
    header = " ".join(f"{i:>{cell}}" for i in range(len(result.classes)))
    lines.append(f"{'':<{width}} {header}")
    for name, row in zip(result.classes, result.confusion_matrix, strict=True):
        lines.append(f"{name:<{width}} " + " ".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)
