"""``camres transfer``: the paper's cross-dataset experiment (§4.1, Figures 3–4) on this
machine — test a checkpoint trained on UC Merced on AID images, or the other way round, through
the class mapping; optionally fine-tune it on the target dataset and compare.

Writes into ``--out``: ``transfer_grid.png`` (the Figure 3 grid: image, CAM and HAR per sample
of every shared and unseen class, and after fine-tuning), ``transfer.json`` (accuracies per
class, predictions for the unseen classes, every sample's HAR boxes) and ``cams/`` (each
sample's overlays and lossless maps). ``--save-model`` also keeps the fine-tuned checkpoint.
torch is imported only inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel

from cli.params import CHECKPOINT, FOLDER, percent, progress_bar, validated
from core.cam_options import CamMethodName, CamOptions
from core.train_spec import OptimizerName, TrainConfig

if TYPE_CHECKING:
    from core.transfer_spec import TransferAccuracy, TransferSummary

__all__ = ["transfer"]

M = TypeVar("M", bound=BaseModel)


#: Fine-tuning starts from a trained network: a smaller step than training from scratch.
FINE_TUNE_LR = 0.01
_DEFAULTS = TrainConfig()
_TITLES = {"ucm": "UC Merced", "aid": "AID"}


@click.command("transfer")
@click.option("--model", "checkpoint", required=True, type=CHECKPOINT, help="camres checkpoint.")
@click.option(
    "--target",
    required=True,
    type=FOLDER,
    help="Image folder of the other dataset (one folder per class, AID or UC Merced names).",
)
@click.option(
    "--mapping",
    required=True,
    type=CHECKPOINT,
    help="Class mapping JSON (ucm_aid_classes.json); its direction follows from the model's "
    "class names.",
)
@click.option(
    "--samples-per-class",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Sample images per shared and unseen class in the grid.",
)
@click.option(
    "--fine-tune-epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Fine-tune on the target dataset for this many epochs (0: test only).",
)
@click.option("--lr", type=float, default=FINE_TUNE_LR, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option(
    "--optimizer",
    type=click.Choice(typing.get_args(OptimizerName)),
    default=_DEFAULTS.optimizer,
    show_default=True,
)
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True)
@click.option(
    "--test-fraction",
    type=float,
    default=_DEFAULTS.test_fraction,
    show_default=True,
    help="Held-out target images for the before/after comparison.",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option(
    "--save-model",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the fine-tuned checkpoint here (needs --fine-tune-epochs).",
)
@click.option(
    "--method",
    type=click.Choice(typing.get_args(CamMethodName)),
    default="cam",
    show_default=True,
)
@click.option(
    "--threshold", type=float, default=0.2, show_default=True, help="HAR threshold (× max)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (created if missing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def transfer(
    checkpoint: Path,
    target: Path,
    mapping: Path,
    samples_per_class: int,
    fine_tune_epochs: int,
    save_model: Path | None,
    method: str,
    threshold: float,
    device: str,
    out_dir: Path,
    as_json: bool,
    **training: Any,
) -> None:
    """Test CHECKPOINT on the other dataset's images (accuracy on the shared classes, CAMs of
    shared and previously unseen classes), optionally after fine-tuning on them."""
    if save_model is not None and fine_tune_epochs == 0:
        raise click.UsageError("--save-model needs --fine-tune-epochs")
    options = validated(
        CamOptions, {"har_threshold": "--threshold"}, method=method, har_threshold=threshold
    )
    config = None
    if fine_tune_epochs:
        config = validated(TrainConfig, {}, epochs=fine_tune_epochs, device=device, **training)

    from core.checkpoint import load_model, save_checkpoint
    from core.datasets import ClassMapping
    from core.evaluation import resolve_device
    from core.transfer import transfer as run_transfer
    from core.transfer_figure import GRID_FILE, REPORT_FILE, write_transfer_report

    table = ClassMapping.load(mapping)
    model, ckpt = load_model(checkpoint, device=resolve_device(device))
    with progress_bar("transfer") as progress:
        result = run_transfer(
            model,
            ckpt.meta,
            target,
            table,
            fine_tune=config,
            samples_per_class=samples_per_class,
            cam_options=options,
            parent_digest=ckpt.digest,
            device=device,
            progress=progress,
        )
    summary = write_transfer_report(result, out_dir)
    digest = None
    if save_model is not None and result.fine_tuned is not None:
        digest = save_checkpoint(save_model, result.fine_tuned.model, result.fine_tuned.meta)
    if as_json:
        click.echo(summary.model_dump_json(indent=2))
        return
    click.echo(_report(summary))
    click.echo(f"wrote {out_dir / GRID_FILE} and {out_dir / REPORT_FILE}")
    if digest is not None:
        click.echo(f"wrote {save_model} ({digest})")


def _report(summary: TransferSummary) -> str:
    """Accuracy before (and after) fine-tuning, per shared class, and what the unseen classes
    were taken for."""
    source, target = _TITLES[summary.source_dataset], _TITLES[summary.target_dataset]
    lines = [
        f"{summary.arch} trained on {source} ({len(summary.model_classes)} classes), "
        f"tested on {target}: {_accuracy(summary.before)}",
        "",
        f"{'target class':<20} {'model class':<20} images  accuracy",
    ]
    for name, outcome in summary.before.per_class.items():
        lines.append(
            f"{name:<20} {outcome.expected or '':<20} {outcome.images:6d}  "
            f"{percent(outcome.accuracy)}"
        )
    for name, outcome in summary.before.unseen.items():
        taken = ", ".join(f"{label} ×{n}" for label, n in list(outcome.predicted.items())[:3])
        lines.append(f"{name:<20} {'(unseen)':<20} {outcome.images:6d}  predicted {taken}")
    tuned = summary.fine_tune
    if tuned is not None:
        lines += [
            "",
            f"fine-tuned for {tuned.result.epochs_run} epoch(s) on {tuned.split['train']} "
            f"images; on {tuned.split['test']} held-out images:",
            f"  before {_accuracy(tuned.before)}",
            f"  after  {_accuracy(tuned.after)}",
        ]
    return "\n".join(lines)


def _accuracy(accuracy: TransferAccuracy) -> str:
    return (
        f"shared-class accuracy {percent(accuracy.accuracy).strip()} "
        f"({accuracy.correct}/{accuracy.images} images)"
    )
