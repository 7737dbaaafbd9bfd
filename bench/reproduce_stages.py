"""The three stages of ``bench/reproduce.py`` (see its docstring): trained accuracy (Table 1),
the damage sweep with masked retraining and Figure 5 (§4.2), and the transfer to AID with
Figure 3 (§4.1). Each stage caches its result in the output folder under a key of everything it
depends on, so a rerun resumes; the sweep caches every location on its own.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import recipe
from bench.reproduce_report import shrink_png
from cli.transfer import FINE_TUNE_LR
from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.damage_spec import DamageSpec
from core.datasets import ClassMapping, ImageDataset, Sample, Split
from core.evaluation import evaluate
from core.figures import figure5_grid, plot_accuracy, plot_drift, sample_panels
from core.images import decode_image
from core.sweep import CellKey, EvalSet, RetrainData, balanced_subset, run_sweep
from core.sweep_report import merge_reports, summary_record, write_report
from core.sweep_spec import SweepConfig, SweepReport, SweepRow
from core.train_spec import DeviceName, TrainConfig
from core.transfer import transfer
from core.transfer_figure import GRID_FILE, transfer_grid, write_transfer_report
from core.transforms import eval_transform, train_transform

__all__ = [
    "MAX_PNG_BYTES",
    "PARTS",
    "Model",
    "Settings",
    "accuracy_stage",
    "cached",
    "log",
    "shown",
    "sweep_stage",
    "transfer_stage",
]

REPO = Path(__file__).resolve().parents[1]
#: Figure 5 of the paper shows airport, baseball field, storage tanks and resort (AID); UC
#: Merced has no resort, harbor stands in for it.
FIGURE5_CLASSES = ("airplane", "baseballdiamond", "storagetanks", "harbor")
#: Figure 3 shows harbor and river (shared) and bridge (unseen); two more shared classes.
FIGURE3_CLASSES = ("Port", "River", "Airport", "StorageTanks", "Bridge")
#: PNGs are committed: each is shrunk (palette, then smaller) to stay under this size.
MAX_PNG_BYTES = 200_000
PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Settings:
    """One run, its command line resolved (``--quick`` or full defaults filled in): where the
    data and outputs are, which stages run, and the experiment's sizes."""

    data: Path
    out: Path
    report_dir: Path
    results: Path
    checkpoint: Path | None
    stages: tuple[str, ...]
    quick: bool
    epochs: int
    lr: float
    label_smoothing: float
    input_size: int
    locations: tuple[str, ...]
    fractions: tuple[float, ...]
    trials: int
    retrain_at: float
    retrain_epochs: int
    retrain_lr: float
    limit: int | None
    retrain_limit: int | None
    samples: int
    figure_locations: tuple[str, ...]
    finetune_epochs: int
    seed: int
    device: str
    threads: int = 2

    @property
    def device_kind(self) -> DeviceName:
        return "cuda" if self.device.startswith("cuda") else "cpu"


@dataclass
class Model:
    """The network under study, its metadata and split, and how it came to be."""

    net: torch.nn.Module
    meta: CheckpointMeta
    digest: str
    path: Path
    split: Split
    info: dict[str, Any]


# --------------------------------------------------------------------------- stage 1


def accuracy_stage(settings: Settings, model: Model) -> dict[str, Any]:
    """Table 1: accuracy on the training split (no augmentation), the validation split (when
    there is one; it picked the epoch kept) and the held-out test split."""
    key = {"digest": model.digest, "limit": settings.limit}

    def compute() -> dict[str, Any]:
        parts = {}
        for part in PARTS:
            samples = _limited(getattr(model.split, part), settings.limit)
            if not samples:
                continue
            dataset = ImageDataset(samples, eval_transform(model.meta.preprocessing))
            evaluation = evaluate(
                model.net, dataset, classes=model.meta.classes, device=settings.device
            )
            parts[part] = {
                "accuracy": evaluation.accuracy,
                "images": evaluation.count,
                "per_class_accuracy": evaluation.per_class_accuracy,
                "per_class_count": evaluation.per_class_count,
            }
            log(f"{part} accuracy {evaluation.accuracy:.4f} on {evaluation.count} images")
        return parts

    return cached(settings.out / "accuracy.json", key, compute)


def _limited(samples: list[Sample], limit: int | None) -> list[Sample]:
    return samples if limit is None else balanced_subset(samples, limit)


# --------------------------------------------------------------------------- stage 2


def sweep_config(settings: Settings, model: Model, location: str) -> SweepConfig:
    smoothing = (model.info["train_config"] or {}).get("label_smoothing", 0.0)
    retrain = recipe.retrain_config(
        epochs=settings.retrain_epochs, lr=settings.retrain_lr, label_smoothing=smoothing,
        seed=settings.seed, device=settings.device_kind,
    )  # fmt: skip
    return SweepConfig(
        locations=[location], fractions=list(settings.fractions), trials=settings.trials,
        seed=settings.seed, retrain_at=[settings.retrain_at], retrain=retrain,
    )  # fmt: skip


def sweep_stage(settings: Settings, model: Model) -> dict[str, Any]:
    """§4.2: every location swept on its own (a resumable unit), then merged into one report
    with its plots and Figure 5 grids."""
    folder = settings.out / "sweep"
    pre = model.meta.preprocessing
    test = _limited(model.split.test, settings.limit)
    eval_set = EvalSet.from_dataset(ImageDataset(test, eval_transform(pre)))
    retrain = RetrainData(
        ImageDataset(_limited(model.split.train, settings.retrain_limit), train_transform(pre)),
        ImageDataset(model.split.val, eval_transform(pre)) if model.split.val else None,
    )
    reports = [
        _swept_location(settings, model, loc, eval_set, retrain, folder)
        for loc in settings.locations
    ]
    merged = _merge(reports, settings, model)
    write_report(merged, folder)  # sweep.json and the CSVs, next to the per-location files
    figures = {
        "accuracy": publish(plot_accuracy(merged, folder / "accuracy.png"), settings),
        "drift": publish(plot_drift(merged, folder / "drift.png"), settings),
    }
    for loc in settings.figure_locations:
        figures[f"figure5_{loc}"] = publish(folder / f"figure5_{loc}.png", settings)
    return {
        "config": merged.config.model_dump(mode="json"),
        "images": merged.images,
        "intact_accuracy": merged.intact_accuracy,
        "seconds": merged.seconds,
        "retrain_images": len(retrain.train),  # type: ignore[arg-type]
        "summary": [summary_record(row) for row in merged.summary],
        "target_weights": {row.location: row.target_weights for row in merged.rows},
        "figure5_samples": [
            (name, shown(sample.path, settings.data))
            for name, sample in _figure5_samples(settings, model)
        ],
        "figures": figures,
    }


def _swept_location(
    settings: Settings,
    model: Model,
    location: str,
    eval_set: EvalSet,
    retrain: RetrainData,
    folder: Path,
) -> SweepReport:
    config = sweep_config(settings, model, location)
    cache = folder / f"{location}.json"
    figure = folder / f"figure5_{location}.png"
    key = normal({
        "digest": model.digest, "config": config.model_dump(mode="json"),
        "limit": settings.limit, "retrain_limit": settings.retrain_limit,
    })  # fmt: skip
    wants_figure = location in settings.figure_locations
    if cache.exists() and (figure.exists() or not wants_figure):
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            log(f"{location}: cached")
            return SweepReport.model_validate(stored["report"])
    log(f"{location}: {config.cells} damaged networks on {len(eval_set)} images")
    figure_key = CellKey(location, settings.retrain_at, 0)
    result = run_sweep(
        model.net,
        model.meta.arch,
        eval_set,
        config,
        retrain_data=retrain,
        keep_retrained=[figure_key] if wants_figure else [],
        on_cell=_log_row,
    )
    report = result.report(model.meta.classes, checkpoint=str(model.path), digest=model.digest)
    if wants_figure:
        _draw_figure5(settings, model, config, figure_key, result.retrained_models, figure)
    folder.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "report": report.model_dump(mode="json")}))
    return report


def _log_row(row: SweepRow) -> None:
    after = "" if row.retrained is None else f" → retrained {row.retrained.accuracy:.3f}"
    log(
        f"  {row.location} {row.fraction:.0%} trial {row.trial}: accuracy {row.accuracy:.3f}, "
        f"flips {row.flip_rate:.3f}, CAM r {_fmt(row.cam_correlation)}{after}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _merge(reports: list[SweepReport], settings: Settings, model: Model) -> SweepReport:
    """The per-location reports as one sweep over every location, checked to cover each cell
    once (:func:`core.sweep_report.merge_reports`); the locations ran one after another."""
    config = reports[0].config.model_copy(update={"locations": list(settings.locations)})
    return merge_reports(config, reports, seconds=sum(r.seconds for r in reports))


def _figure5_samples(settings: Settings, model: Model) -> list[tuple[str, Sample]]:
    """(class, test image path) for the Figure 5 grid: the paper's classes first, then others,
    each the first test image of its class by file name."""
    first: dict[str, Sample] = {}
    for sample in sorted(model.split.test, key=lambda s: s.path.name):
        first.setdefault(model.meta.classes[sample.label], sample)
    order = [c for c in FIGURE5_CLASSES if c in first] + sorted(set(first) - set(FIGURE5_CLASSES))
    return [(name, first[name]) for name in order[: settings.samples]]


def _draw_figure5(
    settings: Settings,
    model: Model,
    config: SweepConfig,
    key: CellKey,
    retrained: dict[CellKey, torch.nn.Module],
    path: Path,
) -> None:
    spec = DamageSpec(targets=[key.location], fraction=key.fraction, fault=config.fault,
                      seed=config.seed)  # fmt: skip
    samples = [
        (s.path.name, decode_image(s.path, name=str(s.path)), label)
        for label, s in _figure5_samples(settings, model)
    ]
    rows = sample_panels(
        model.net,
        model.meta,
        samples,
        spec,
        retrained=retrained.get(key),
        options=CamOptions(method=config.method, har_threshold=config.har_threshold),
    )
    title = (
        f"{model.meta.arch} on UC Merced test images: {key.location} at {key.fraction:.0%} "
        f"stuck-at-zero (trial 0), retrained {config.retrain.epochs} epoch(s)"
    )
    figure5_grid(rows, path, title=title)


# --------------------------------------------------------------------------- stage 3


def transfer_stage(settings: Settings, model: Model) -> dict[str, Any]:
    """§4.1: the UC Merced network on the AID slice; Figure 3 and fine-tuning."""
    folder = settings.out / "transfer"
    config = None
    if settings.finetune_epochs > 0:
        config = TrainConfig(
            epochs=settings.finetune_epochs, lr=FINE_TUNE_LR, batch_size=32,
            val_fraction=0.0, test_fraction=0.25, seed=settings.seed, device=settings.device_kind,
        )  # fmt: skip
    key = {"digest": model.digest, "fine_tune": config and config.model_dump(mode="json")}

    def compute() -> dict[str, Any]:
        result = transfer(
            model.net,
            model.meta,
            settings.data / "aid-mini",
            ClassMapping.load(settings.data / "ucm_aid_classes.json"),
            fine_tune=config,
            parent_digest=model.digest,
            device=settings.device,
        )
        summary = write_transfer_report(result, folder)
        chosen = [s for s in result.samples if s.target_class in FIGURE3_CLASSES]
        if 0 < len(chosen) < len(result.samples):
            transfer_grid(replace(result, samples=chosen), folder / "figure3.png")
        else:  # the full grid already shows just these
            shutil.copyfile(folder / GRID_FILE, folder / "figure3.png")
        return _transfer_numbers(summary.model_dump(mode="json"))

    numbers = cached(folder / "stage.json", key, compute)
    numbers["figures"] = {"figure3": publish(folder / "figure3.png", settings)}
    return numbers


def _transfer_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without per-sample CAM details (kept in ``--out``'s transfer.json)."""
    samples = [
        {k: s[k] for k in ("image", "target_class", "kind", "expected")}
        | {
            "predicted_before": s["before"]["prediction"],
            "correct_before": s["correct_before"],
            "predicted_after": s["after"] and s["after"]["prediction"],
            "correct_after": s["correct_after"],
        }
        for s in summary["samples"]
    ]
    return {**{k: v for k, v in summary.items() if k != "samples"}, "samples": samples}


# --------------------------------------------------------------------------- helpers


def cached(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> Any:
    """``compute()``'s value, stored in ``path`` with ``key``; reused while the key matches."""
    key = normal(key)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            log(f"{shown(path)}: cached")
            return stored["value"]
    value = normal(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=2))
    return value


def normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so keys compare equal."""
    return json.loads(json.dumps(value))


def publish(png: Path, settings: Settings) -> str:
    """Copy a figure into the report folder, shrunk for the repository; its name there."""
    if not png.exists():
        return ""
    target = settings.report_dir / png.name
    shrink_png(png, target, MAX_PNG_BYTES)
    return target.name


def shown(path: Path, root: Path = REPO) -> str:
    """``path`` relative to ``root`` when inside it (no home folders in the report)."""
    try:
        return str(path.absolute().relative_to(root.absolute()))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
