"""How much faster the fast damage sweep is than the naive loop, with identical results.

The paper's sweep (Vasu & Savakis §4.2) damages ResNet-50 at D1–D4 with 5 % … 95 % of the weights
(76 cells per trial) and evaluates every damaged network on the same images. Both strategies of
:func:`core.sweep.run_sweep` run here, in the same process, on the same images and model:

* ``naive`` — per cell: a deep copy of the model, damaged, and a full forward pass of the intact
  and the damaged network over every image (the cell recomputes everything it compares);
* ``fast`` — intact outputs once; per location the activations before the first damaged layer
  once per image, only the rest rerun per cell; damage applied and restored in place.

Targets: identical results — per cell, the predictions and the raw CAMs of every image are
compared bit for bit, and so are the accuracies — and the fast sweep ≥ 2× faster (wall clock,
summed over the runs of each strategy; by default fast, naive, naive, fast, so that a load that
drifts during the benchmark on a shared machine weighs on both alike; CPU time is reported too).
Also reported: the speed-up without the naive loop's per-cell intact pass, i.e. from the
activation cache alone, measured in the same runs.

On 2 shared CPU cores ResNet-50 at 224 px runs ~12 images/s, so the naive loop over the full
default sweep (76 cells × 200 images, twice) takes the better part of an hour. The default here
is a reduced configuration (40 images, 4 locations × 5 fractions); ``--full`` runs the default
sweep on 200 images. Random initialisation unless ``--checkpoint`` is given (the JSON says which).

    .venv/bin/python bench/sweep_speed.py                 # → bench/results/sweep_speed.json
    .venv/bin/python bench/sweep_speed.py --full          # 200 images, 4 × 19 levels
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.checkpoint import load_model  # noqa: E402
from core.datasets import ImageDataset, ImageFolder  # noqa: E402
from core.models import build_model  # noqa: E402
from core.preprocessing import Preprocessing  # noqa: E402
from core.sweep import EvalSet, SweepResult, balanced_subset, run_sweep  # noqa: E402
from core.sweep_spec import SweepConfig, parse_fractions  # noqa: E402
from core.transforms import eval_transform  # noqa: E402

TARGET_SPEEDUP = 2.0
REDUCED = {"images": 40, "fractions": "0.05:0.95:0.2"}
FULL = {"images": 200, "fractions": "0.05:0.95:0.05"}
#: Run orders. On a shared machine the load drifts; "abba" times each strategy twice,
#: symmetrically, so a linear drift affects both equally.
ORDERS = {"ab": ("fast", "naive"), "abba": ("fast", "naive", "naive", "fast")}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    model, described, pre = _model(args)
    folder = ImageFolder.from_path(args.data, classes=described["classes"])
    samples = balanced_subset(folder.samples, args.images)
    eval_set = EvalSet.from_dataset(ImageDataset(samples, eval_transform(pre)))
    config = SweepConfig(
        locations=args.locations,
        fractions=parse_fractions(args.fractions),
        trials=args.trials,
        batch_size=args.batch_size,
    )
    print(f"{config.cells} cells × {len(eval_set)} images, {described['model']}", flush=True)
    load_before = os.getloadavg()
    order = ORDERS[args.order]
    timed = [(s, _timed(model, described["arch"], eval_set, config, s)) for s in order]
    runs = {s: _combine([run for name, run in timed if name == s]) for s in ("fast", "naive")}
    fast, naive = runs["fast"]["result"], runs["naive"]["result"]
    checks = _compare(fast, naive)
    checks["repeats_identical"] = all(
        _compare(runs[name]["result"], run["result"])["identical"] for name, run in timed
    )
    checks["identical"] = checks["identical"] and checks["repeats_identical"]
    # Same number of runs of each: the ratio of the sums is the ratio of the means.
    speedup = runs["naive"]["wall_s"] / runs["fast"]["wall_s"]
    shared_intact = runs["naive"]["wall_s"] - runs["naive"]["naive_intact_s"]
    report = {
        "benchmark": "sweep_speed",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "configuration": "full default sweep" if args.full else "reduced",
            "images": len(eval_set),
            "image_source": f"{args.data} (balanced over {len(folder.classes)} classes)",
            "input_size": pre.input_size,
            "locations": config.locations,
            "fractions": config.fractions,
            "trials": config.trials,
            "cells": config.cells,
            "fault": config.fault.model_dump(),
            "batch_size": config.batch_size,
            "cache_mb": config.cache_mb,
            "order": " ".join(order),
            **described["info"],
        },
        "target": f"identical per-cell predictions, maps and accuracies; speed-up ≥ "
        f"{TARGET_SPEEDUP:g}× (wall clock, naive / fast)",
        "identical": checks["identical"],
        "speedup": round(speedup, 3),
        "speedup_cpu_time": round(runs["naive"]["cpu_s"] / runs["fast"]["cpu_s"], 3),
        "speedup_vs_naive_with_shared_intact": round(shared_intact / runs["fast"]["wall_s"], 3),
        "meets_target": checks["identical"] and speedup >= TARGET_SPEEDUP,
        "strategies": {name: _summary(run) for name, run in runs.items()},
        "checks": checks,
        "accuracy_per_cell": {
            f"{r.location} {r.fraction:g} t{r.trial}": r.accuracy for r in fast.rows
        },
        "intact_accuracy": fast.intact_accuracy,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"fast {runs['fast']['wall_s']:.1f} s, naive {runs['naive']['wall_s']:.1f} s: "
        f"{speedup:.2f}× (cache alone {report['speedup_vs_naive_with_shared_intact']:.2f}×), "
        f"identical={checks['identical']}"
    )
    print(f"wrote {args.output}")
    return 0 if report["meets_target"] else 1


def _model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], Preprocessing]:
    if args.checkpoint is not None:
        model, ckpt = load_model(args.checkpoint)
        info = {"weights": f"checkpoint {args.checkpoint} ({ckpt.digest})"}
        arch, classes, pre = ckpt.meta.arch, ckpt.meta.classes, ckpt.meta.preprocessing
    else:
        classes = ImageFolder.from_path(args.data).classes
        torch.manual_seed(0)
        arch, pre = args.arch, Preprocessing(input_size=args.size)
        model = build_model(arch, len(classes)).eval()
        info = {"weights": "random initialisation (torch.manual_seed(0))"}
    described = {
        "arch": arch,
        "classes": classes,
        "model": f"{arch} at {pre.input_size} px, {info['weights']}",
        "info": {"arch": arch, "classes": len(classes), **info},
    }
    return model, described, pre


def _timed(
    model: nn.Module, arch: str, eval_set: EvalSet, config: SweepConfig, strategy: str
) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run_sweep(model, arch, eval_set, config, strategy=strategy)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{strategy}: {wall:.1f} s", flush=True)
    return {"result": result, "wall_s": wall, "cpu_s": cpu}


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one strategy: the first one's result, summed times, every run's time."""
    return {
        "result": runs[0]["result"],
        "wall_s": sum(r["wall_s"] for r in runs),
        "cpu_s": sum(r["cpu_s"] for r in runs),
        "naive_intact_s": sum(r["result"].timings.get("naive_intact_s", 0.0) for r in runs),
        "runs": [
            {
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                "timings_s": {k: round(v, 2) for k, v in sorted(r["result"].timings.items())},
            }
            for r in runs
        ],
    }


def _compare(fast: SweepResult, naive: SweepResult) -> dict[str, Any]:
    keys = sorted(fast.outputs)
    same_keys = keys == sorted(naive.outputs)
    predictions = all(
        torch.equal(fast.outputs[k].predictions, naive.outputs[k].predictions) for k in keys
    )
    maps = all(torch.equal(fast.outputs[k].maps, naive.outputs[k].maps) for k in keys)
    accuracies = [r.accuracy for r in fast.rows] == [r.accuracy for r in naive.rows]
    rows = [r.model_dump() for r in fast.rows] == [r.model_dump() for r in naive.rows]
    intact = torch.equal(fast.intact.maps, naive.intact.maps) and torch.equal(
        fast.intact.predictions, naive.intact.predictions
    )
    identical = same_keys and predictions and maps and accuracies and rows and intact
    return {
        "identical": identical,
        "cells_compared": len(keys),
        "predictions_equal": predictions,
        "maps_equal_bitwise": maps,
        "accuracies_equal": accuracies,
        "rows_equal": rows,
        "intact_equal": intact,
    }


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    return {"wall_s": round(run["wall_s"], 2), "cpu_s": round(run["cpu_s"], 2), "runs": run["runs"]}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="200 images, 4 × 19 levels.")
    parser.add_argument("--images", type=int, default=None, help="[40; --full: 200]")
    parser.add_argument("--fractions", default=None, help="[0.05:0.95:0.2; --full: …:0.05]")
    parser.add_argument("--locations", nargs="+", default=["D1", "D2", "D3", "D4"])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument(
        "--order",
        choices=sorted(ORDERS),
        default="abba",
        help="abba: fast, naive, naive, fast — cancels a load that drifts during the run.",
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="Input size (random init).")
    parser.add_argument("--checkpoint", type=Path, default=None, help="A trained checkpoint.")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "ucm")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "bench" / "results" / "sweep_speed.json"
    )
    args = parser.parse_args(argv)
    preset = FULL if args.full else REDUCED
    args.images = args.images or preset["images"]
    args.fractions = args.fractions or preset["fractions"]
    return args


if __name__ == "__main__":
    sys.exit(main())
