"""``camres sweep``: the paper's resilience experiment on this machine — damage a checkpoint at
every location and fraction, several trials each, and measure accuracy and CAM drift
(:mod:`core.sweep`), optionally with masked retraining at chosen levels.

Writes into ``--out``: ``sweep.json`` (the whole report), ``sweep_summary.csv`` (mean and
confidence interval per location and fraction), ``sweep_cells.csv`` (one row per trial),
``sweep_cells.jsonl`` (rows appended as cells finish: readable while the sweep runs),
``accuracy.png``, ``drift.png`` and, with ``--sample``, ``figure5.png`` (the grid of the
paper's Figure 5). A tqdm bar shows progress per cell on a terminal.

Evaluation images: every image of ``--data`` in the model's classes (``--split all``), or only
the test split the checkpoint's training held out (``--split test``). Retraining learns from the
training split of ``--data`` recorded in the checkpoint (else drawn from ``--seed``); with
``--split all`` the evaluation then includes images retraining has seen.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from cli.params import CHECKPOINT, FOLDER, validated
from core.cam_options import CamMethodName, CamOptions
from core.damage_spec import BitFlip, DamageSpec, FaultSpec, Gaussian, StuckAt
from core.exceptions import InputError
from core.progress import Progress, ProgressCallback
from core.sweep_spec import CamClass, SweepConfig, SweepRow, parse_fractions
from core.train_spec import TrainConfig

if TYPE_CHECKING:
    from core.checkpoint import Checkpoint
    from core.datasets import Sample
    from core.sweep import EvalSet, RetrainData

__all__ = ["sweep"]


#: SweepConfig field → the option that sets it, for error messages.
_OPTIONS = {
    "locations": "--locations",
    "fractions": "--fractions",
    "retrain_at": "--retrain-at",
    "har_threshold": "--threshold",
    "cache_mb": "--cache-mb",
}


@click.command("sweep")
@click.option("--model", "checkpoint", required=True, type=CHECKPOINT, help="camres checkpoint.")
@click.option("--data", required=True, type=FOLDER, help="Image folder (one folder per class).")
@click.option(
    "--classes-from",
    type=CHECKPOINT,
    default=None,
    help="Class mapping JSON (ucm_aid_classes.json) for data that names classes differently, "
    "e.g. AID images for a UC Merced model; unmapped classes are skipped.",
)
@click.option(
    "--split",
    type=click.Choice(["all", "test"]),
    default="all",
    show_default=True,
    help="test: only the images the checkpoint's training held out.",
)
@click.option(
    "--locations",
    "--location",
    "locations",
    multiple=True,
    help="D1–D4, module names or globs; repeat or separate with commas [default: D1,D2,D3,D4].",
)
@click.option(
    "--fractions",
    default="0.05:0.95:0.05",
    show_default=True,
    help="start:stop:step (both ends included) or a,b,c.",
)
@click.option("--trials", type=int, default=3, show_default=True, help="Seeds per level.")
@click.option("--seed", type=int, default=0, show_default=True, help="Trial t uses seed + t.")
@click.option(
    "--fault",
    type=click.Choice(["stuck_at", "bit_flip", "gaussian"]),
    default="stuck_at",
    show_default=True,
)
@click.option("--value", type=float, default=0.0, show_default=True, help="stuck_at value.")
@click.option("--bit", "bits", type=int, multiple=True, help="bit_flip: allowed bit (repeat).")
@click.option("--sigma", type=float, default=1.0, show_default=True, help="gaussian: σ.")
@click.option(
    "--method", type=click.Choice(typing.get_args(CamMethodName)), default="cam", show_default=True
)
@click.option(
    "--cam-class",
    type=click.Choice(typing.get_args(CamClass)),
    default="predicted",
    show_default=True,
    help="Compare the maps of each network's own top-1 class, or of the true class.",
)
@click.option("--threshold", type=float, default=0.2, show_default=True, help="HAR threshold.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N images.")
@click.option(
    "--retrain-at",
    "retrain_at",
    multiple=True,
    help="Also retrain at these fractions (repeat or separate with commas).",
)
@click.option("--retrain-epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--retrain-lr", type=float, default=0.01, show_default=True)
@click.option("--retrain-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--sample",
    "--samples",
    "samples",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Image for the Figure 5 grid (repeat).",
)
@click.option("--figure-location", default=None, help="Grid location [default: the last one].")
@click.option(
    "--figure-fraction",
    type=float,
    default=None,
    help="Grid damage level [default: the first --retrain-at level, else 0.5].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--cache-mb", type=float, default=512.0, show_default=True, help="Activation cache budget."
)
@click.option(
    "--strategy",
    type=click.Choice(["fast", "naive"]),
    default="fast",
    show_default=True,
    help="naive: the slow reference (every cell recomputed from scratch).",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (created if missing).",
)
def sweep(
    checkpoint: Path,
    data: Path,
    classes_from: Path | None,
    split: str,
    samples: tuple[Path, ...],
    limit: int | None,
    figure_location: str | None,
    figure_fraction: float | None,
    strategy: str,
    device: str,
    out_dir: Path,
    **options: Any,
) -> None:
    """Damage the --model checkpoint at every location and fraction, several trials each, and
    measure accuracy, label flips and CAM drift against the intact network."""
    config = _config(device=device, **options)
    figure = _figure_cell(config, figure_location, figure_fraction)

    # torch is imported only here: `camres --help` must stay fast.
    from core.checkpoint import load_model
    from core.figures import figure5_grid, plot_accuracy, plot_drift, sample_panels
    from core.sweep import CellKey, run_sweep
    from core.sweep_report import JsonlWriter, write_report

    model, ckpt = load_model(checkpoint, device=device)
    eval_set, retrain_data = _data(ckpt, data, classes_from, split, config, limit)
    key = CellKey(figure[0], figure[1], 0)
    jsonl = JsonlWriter(out_dir / "sweep_cells.jsonl")
    with _progress_bar(config) as (progress, show_row):

        def on_row(row: SweepRow) -> None:
            jsonl(row)
            show_row(row)

        result = run_sweep(
            model,
            ckpt.meta.arch,
            eval_set,
            config,
            strategy=typing.cast(Any, strategy),
            retrain_data=retrain_data,
            keep_retrained=[key],
            progress=progress,
            on_cell=on_row,
        )
    report = result.report(ckpt.meta.classes, checkpoint=str(checkpoint), digest=ckpt.digest or "")
    written = write_report(report, out_dir)
    written["accuracy_png"] = plot_accuracy(report, out_dir / "accuracy.png")
    written["drift_png"] = plot_drift(report, out_dir / "drift.png")
    if samples:
        spec = DamageSpec(
            targets=[key.location], fraction=key.fraction, fault=config.fault, seed=config.seed
        )
        rows = sample_panels(
            model,
            ckpt.meta,
            _samples(samples, ckpt.meta.classes, classes_from),
            spec,
            retrained=result.retrained_models.get(key),
            options=CamOptions(method=config.method, har_threshold=config.har_threshold),
        )
        title = f"{ckpt.meta.arch}, {key.location} at {key.fraction:.0%} ({config.fault.kind})"
        written["figure5_png"] = figure5_grid(rows, out_dir / "figure5.png", title=title)
    click.echo(
        f"swept {config.cells} damaged networks on {report.images} images in "
        f"{result.seconds:.0f} s; intact accuracy {100 * report.intact_accuracy:.1f}%"
    )
    for path in [*written.values(), jsonl.path]:
        click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- options


def _config(
    locations: tuple[str, ...],
    fractions: str,
    retrain_at: tuple[str, ...],
    retrain_epochs: int,
    retrain_lr: float,
    retrain_batch_size: int,
    fault: str,
    value: float,
    bits: tuple[int, ...],
    sigma: float,
    threshold: float,
    device: str,
    **settings: Any,
) -> SweepConfig:
    try:
        levels = parse_fractions(fractions)
        retrain_levels = parse_fractions(",".join(retrain_at)) if retrain_at else []
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--fractions/--retrain-at") from None
    retrain = validated(
        TrainConfig,
        {"epochs": "--retrain-epochs", "lr": "--retrain-lr", "batch_size": "--retrain-batch-size"},
        epochs=retrain_epochs,
        lr=retrain_lr,
        batch_size=retrain_batch_size,
        seed=settings["seed"],
        # TrainConfig names devices by kind; retraining runs where the sweep runs.
        device="cuda" if device.startswith("cuda") else "cpu",
    )
    return validated(
        SweepConfig,
        _OPTIONS,
        locations=_split_commas(locations) or None,
        fractions=levels,
        retrain_at=retrain_levels,
        retrain=retrain,
        fault=_fault(fault, value, bits, sigma),
        har_threshold=threshold,
        **settings,
    )


def _fault(kind: str, value: float, bits: tuple[int, ...], sigma: float) -> FaultSpec:
    makers: dict[str, Callable[[], FaultSpec]] = {
        "stuck_at": lambda: validated(StuckAt, {"value": "--value"}, value=value),
        "bit_flip": lambda: validated(BitFlip, {"bits": "--bit"}, bits=list(bits) or None),
        "gaussian": lambda: validated(Gaussian, {"sigma": "--sigma"}, sigma=sigma),
    }
    return makers[kind]()


def _split_commas(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _figure_cell(
    config: SweepConfig, location: str | None, fraction: float | None
) -> tuple[str, float]:
    location = location or config.locations[-1]
    if location not in config.locations:
        raise click.BadParameter(
            f"{location!r} is not among --locations", param_hint="--figure-location"
        )
    if fraction is None:
        fraction = config.retrain_at[0] if config.retrain_at else 0.5
    if not 0.0 < fraction <= 1.0:
        raise click.BadParameter("must lie in (0, 1]", param_hint="--figure-fraction")
    return location, fraction


# --------------------------------------------------------------------------- data


def _data(
    ckpt: Checkpoint,
    root: Path,
    classes_from: Path | None,
    split: str,
    config: SweepConfig,
    limit: int | None,
) -> tuple[EvalSet, RetrainData | None]:
    from core.datasets import ClassMapping, ImageDataset, ImageFolder, stratified_split
    from core.sweep import EvalSet, RetrainData, balanced_subset
    from core.training_data import SplitSettings, training_split
    from core.transforms import eval_transform, train_transform

    classes = ckpt.meta.classes
    mapping = ClassMapping.load(classes_from) if classes_from else ClassMapping(ucm_to_aid={})
    samples: list[Sample] = mapping.align(ImageFolder.from_path(root), classes).samples
    recorded = training_split(ckpt.meta)
    parts = recorded or SplitSettings(
        config.seed, config.retrain.val_fraction, config.retrain.test_fraction
    )
    held = stratified_split(samples, parts.val_fraction, parts.test_fraction, parts.seed)
    if split == "test":
        if recorded is None:
            raise click.UsageError("the checkpoint records no training split; use --split all")
        samples = held.test
    if limit is not None:
        samples = balanced_subset(samples, limit)
    pre = ckpt.meta.preprocessing
    eval_set = EvalSet.from_dataset(ImageDataset(samples, eval_transform(pre)))
    if not config.retrain_at:
        return eval_set, None
    val = ImageDataset(held.val, eval_transform(pre)) if held.val else None
    return eval_set, RetrainData(ImageDataset(held.train, train_transform(pre)), val)


def _samples(
    paths: tuple[Path, ...], classes: list[str], classes_from: Path | None
) -> list[tuple[str, Any, str | None]]:
    """(name, decoded image, true class or None): the class is the image's folder name, in the
    model's classes directly or through the class mapping."""
    from core.datasets import ClassMapping
    from core.images import decode_image

    mapping = ClassMapping.load(classes_from) if classes_from else ClassMapping(ucm_to_aid={})
    both_ways = {**mapping.ucm_to_aid, **mapping.aid_to_ucm}
    decoded = []
    for path in paths:
        folder = path.parent.name
        label = folder if folder in classes else both_ways.get(folder)
        decoded.append(
            (path.name, decode_image(path, name=str(path)), label if label in classes else None)
        )
    return decoded


# --------------------------------------------------------------------------- progress


@contextmanager
def _progress_bar(
    config: SweepConfig,
) -> Iterator[tuple[ProgressCallback, Callable[[SweepRow], None]]]:
    """A tqdm bar counting cells (retrained cells count twice), with the latest cell and its
    accuracy as postfix; hidden when stderr is not a terminal."""
    total = config.cells + len(config.locations) * len(config.retrain_at) * config.trials
    with tqdm(total=total, desc="sweep", unit="cell", disable=None, leave=False) as bar:
        last: dict[str, str] = {}

        def update(progress: Progress) -> None:
            bar.n = round(progress.fraction * total, 2)
            bar.set_description(progress.stage, refresh=False)
            bar.set_postfix({"cell": progress.message, **last}, refresh=False)
            bar.refresh()

        def on_row(row: SweepRow) -> None:
            last["acc"] = f"{row.accuracy:.3f}"

        yield update, on_row
