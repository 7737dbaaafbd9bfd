"""Reproduction of Vasu & Savakis (``../shared/paper.md``) on ``../shared/data``, at CPU scale.

Three stages, each cached in ``--out`` (git-ignored ``bench/out/reproduce/``) so a rerun resumes
where the last one stopped; a stage is redone when its settings or the checkpoint change:

1. ``accuracy`` — the trained network's accuracy, overall and per class, on the training and
   the held-out test split of UC Merced's 14 classes shared with AID (paper Table 1).
2. ``sweep`` — stuck-at-zero damage at D1–D4 × 5 … 95 % (step 5) × trials on the test split:
   accuracy with confidence intervals, label flips and CAM drift (§4.2, :mod:`core.sweep`),
   masked retraining of every trial at 50 % (§3.2), and a Figure-5 grid per location
   (cached per location).
3. ``transfer`` — the network tested on the AID slice through the class mapping: accuracy on
   the shared classes, what the unseen class (Bridge) is taken for, a Figure-3 grid of shared
   and unseen classes, and optional fine-tuning on AID (§4.1, :mod:`core.transfer`).

The model is ResNet-18 at 128 px trained from scratch (:mod:`bench.recipe`), a CPU-sized
stand-in for the paper's ImageNet-pretrained ResNet50 at 224 px. ``--checkpoint`` reuses a
camres checkpoint (e.g. ``bench/out/ucm14_resnet18_128.safetensors`` of
``bench/damage_retrain.py``): its recorded split decides the test images, so no training image
is scored. Without it the recipe trains one into ``--out``.

Writes ``bench/report/REPORT.md`` with its PNGs (:mod:`bench.reproduce_report`) and every
number to ``bench/results/reproduce.json``. ``--quick`` is a smoke run (three fractions, one
trial, few images, one epoch).

Run: ``.venv/bin/python bench/reproduce.py --checkpoint bench/out/ucm14_resnet18_128.safetensors``
(22 min on 2 quiet CPU cores, measured; ``--quick``: a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make core/ and bench/ importable
    sys.path.insert(0, str(REPO))

from bench import recipe  # noqa: E402
from bench.reproduce_report import PAPER, write_markdown  # noqa: E402
from bench.reproduce_stages import (  # noqa: E402
    PARTS,
    Model,
    Settings,
    accuracy_stage,
    log,
    shown,
    sweep_stage,
    transfer_stage,
)
from core.checkpoint import load_model  # noqa: E402
from core.checkpoint_meta import CheckpointMeta  # noqa: E402
from core.datasets import ImageFolder, stratified_split  # noqa: E402
from core.sweep_spec import parse_fractions  # noqa: E402
from core.training import train_classifier  # noqa: E402
from core.training_data import training_split  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO.parent / "shared" / "data"))
STAGES = ("accuracy", "sweep", "transfer")

#: Defaults of the full run, and of ``--quick`` (a smoke run in minutes).
FULL: dict[str, Any] = {
    "epochs": 40, "fractions": "0.05:0.95:0.05", "trials": 3, "retrain_epochs": 3,
    "limit": None, "retrain_limit": None, "samples": 4,
    "figure_locations": "D1,D2,D3,D4", "finetune_epochs": 5,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "epochs": 1, "fractions": "0.25,0.5,0.75", "trials": 1, "retrain_epochs": 1,
    "limit": 42, "retrain_limit": 140, "samples": 2,
    "figure_locations": "D4", "finetune_epochs": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings = parse_settings(argv)
    torch.set_num_threads(settings.threads)
    settings.out.mkdir(parents=True, exist_ok=True)
    model = load_or_train(settings)
    results: dict[str, Any] = {
        "benchmark": "reproduce",
        "paper": PAPER,
        "environment": {},  # filled in at the end: the load average the run saw
        "settings": {k: _jsonable(v) for k, v in asdict(settings).items()},
        "model": model.info,
    }
    steps: dict[str, Callable[[Settings, Model], dict[str, Any]]] = {
        "accuracy": accuracy_stage,
        "sweep": sweep_stage,
        "transfer": transfer_stage,
    }
    for name in settings.stages:
        log(f"stage {name}")
        results[name] = steps[name](settings, model)
    results["environment"] = _environment()
    settings.results.parent.mkdir(parents=True, exist_ok=True)
    settings.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = write_markdown(results, settings.report_dir)
    _drop_stale_figures(settings.report_dir, results)
    log(f"wrote {report} and {settings.results}")
    return results


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ucm/, aid-mini/, mapping")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a trained model")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "reproduce")
    parser.add_argument("--report-dir", type=Path, default=REPO / "bench" / "report")
    parser.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results" / "reproduce.json"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="smoke run: few cells and images")
    parser.add_argument("--epochs", type=int, help="training epochs (without --checkpoint)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--input-size", type=int, default=recipe.INPUT_SIZE)
    parser.add_argument("--locations", default="D1,D2,D3,D4")
    parser.add_argument("--fractions", help="start:stop:step or a,b,c")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--retrain-at", type=float, default=0.5)
    parser.add_argument("--retrain-epochs", type=int)
    parser.add_argument("--retrain-lr", type=float, default=0.005)
    parser.add_argument("--limit", type=int, help="at most N test images (balanced)")
    parser.add_argument("--retrain-limit", type=int, help="at most N retraining images")
    parser.add_argument("--samples", type=int, help="images in each Figure 5 grid")
    parser.add_argument("--figure-locations", help="locations with a Figure 5 grid")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning on AID (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="damage seeds: trial t uses seed + t")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    for name in ("ucm", "aid-mini", "ucm_aid_classes.json"):
        if not (args.data / name).exists():
            parser.error(f"--data: {args.data / name} is missing (see ../shared/data/README.md)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint: no such file {args.checkpoint}")
    fractions = tuple(parse_fractions(pick["fractions"]))
    if args.retrain_at not in fractions:
        parser.error(f"--retrain-at {args.retrain_at} is not among --fractions {fractions}")
    locations = _names(args.locations)
    figure_locations = tuple(n for n in _names(pick["figure_locations"]) if n in locations)
    return Settings(
        data=args.data, out=args.out, report_dir=args.report_dir, results=args.results,
        checkpoint=args.checkpoint, stages=stages, quick=args.quick, epochs=pick["epochs"],
        lr=args.lr, label_smoothing=args.label_smoothing, input_size=args.input_size,
        locations=locations, fractions=fractions, trials=pick["trials"],
        retrain_at=args.retrain_at, retrain_epochs=pick["retrain_epochs"],
        retrain_lr=args.retrain_lr, limit=pick["limit"], retrain_limit=pick["retrain_limit"],
        samples=pick["samples"], figure_locations=figure_locations,
        finetune_epochs=pick["finetune_epochs"], seed=args.seed, device=args.device,
        threads=args.threads,
    )  # fmt: skip


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# --------------------------------------------------------------------------- the model


def load_or_train(settings: Settings) -> Model:
    """The ``--checkpoint`` model, or the recipe's, trained into ``--out`` (reused when the
    recipe is unchanged)."""
    path = settings.checkpoint
    trained_here: dict[str, Any] = {}
    if path is None:
        path = settings.out / "model.safetensors"
        trained_here = _train(settings, path)
    net, ckpt = load_model(path, device=settings.device)
    recorded = training_split(ckpt.meta)
    if recorded is None:
        raise SystemExit(f"{path} records no training split: cannot tell its test images")
    folder = ImageFolder.from_path(settings.data / "ucm", classes=ckpt.meta.classes)
    split = stratified_split(
        folder.samples, recorded.val_fraction, recorded.test_fraction, recorded.seed
    )
    info = {
        "checkpoint": shown(path),
        "digest": ckpt.digest,
        "arch": ckpt.meta.arch,
        "input_size": ckpt.meta.preprocessing.input_size,
        "classes": ckpt.meta.classes,
        "split": {"seed": recorded.seed, **{k: len(getattr(split, k)) for k in PARTS}},
        "train_config": _train_config(ckpt.meta),
        "trained_by_this_run": bool(trained_here),
        **trained_here,
    }
    assert ckpt.digest is not None  # a file's checkpoint always has one
    return Model(net, ckpt.meta, ckpt.digest, path, split, info)


def _train(settings: Settings, path: Path) -> dict[str, Any]:
    # The split seed stays the recipe's: its test images took no part in choosing the recipe.
    config = recipe.train_config(
        epochs=settings.epochs, lr=settings.lr, label_smoothing=settings.label_smoothing,
        input_size=settings.input_size, device=settings.device_kind,
    )  # fmt: skip
    stamp = path.with_suffix(".train.json")
    key = {"config": config.model_dump(mode="json"), "data": str(settings.data / "ucm")}
    if path.exists() and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == key:
            log(f"reusing {path}")
            return dict(info["value"])
    log(f"training {recipe.ARCH} from scratch: {config.model_dump_json()}")
    classes = recipe.shared_classes(settings.data / "ucm_aid_classes.json")
    started = time.perf_counter()
    trained = train_classifier(settings.data / "ucm", recipe.ARCH, config, classes=classes)
    value = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": [e.model_dump(mode="json") for e in trained.result.history],
    }
    trained.save(path)
    stamp.write_text(json.dumps({"key": key, "value": value}, indent=2))
    return value


def _train_config(meta: CheckpointMeta) -> dict[str, Any] | None:
    for step in reversed(meta.lineage):
        if step.op == "train" and isinstance(step.params.get("config"), dict):
            return dict(step.params["config"])
    return None


def _drop_stale_figures(report_dir: Path, results: dict[str, Any]) -> None:
    """Remove figures an earlier run published that this report no longer links (e.g. a grid
    of a location left out now), so the folder holds what REPORT.md shows."""
    linked = {
        name for stage in STAGES for name in (results.get(stage) or {}).get("figures", {}).values()
    }
    for pattern in ("accuracy.png", "drift.png", "figure3.png", "figure5_*.png"):
        for png in report_dir.glob(pattern):
            if png.name not in linked:
                png.unlink()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return shown(value)
    return list(value) if isinstance(value, tuple) else value


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    main()
