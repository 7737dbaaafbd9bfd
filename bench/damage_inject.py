"""How long injecting, restoring and holding paper-style damage takes on the CPU.

The paper sweeps D = 5 … 95 % at four locations (Vasu & Savakis §4.2), so one sweep is 76
injections into ResNet-50; each should cost well under a forward pass. Target: injecting 50 %
stuck-at-zero damage into D4 of ResNet-50 (3 layers, 2.6 M weights) in < 50 ms (median).

Cases, each timed ``--repeats`` times after ``--warmup`` runs, reporting the median wall time,
its spread (min, max) and the median CPU time of the process, with torch using every core this
process may use (``--threads``), on a randomly initialised ResNet-50 (the cost does not depend
on the values):

* ``inject`` — :func:`core.damage.apply_damage` (masks, faults, the intact values kept for
  restore) for D4 and for D1–D4 together, with each fault model, *cold*: the seeded
  permutations are drawn anew in every run (:data:`core.masks.PERMUTATIONS` is cleared);
* ``inject … (cached)`` — the same with the permutations already cached, as for every fraction
  after the first of a sweep, or a second damage job with the same seed;
* ``masks`` — :func:`core.damage.damage_masks` alone, cold (the seeded permutations);
* ``restore`` — :meth:`core.damage.Damage.restore`;
* ``verify`` — :func:`core.damage.verify_damage` (what the worker reports after retraining);
* ``hold_step`` — the extra cost per optimizer step of :func:`core.damage.hold_damage` (its
  post-step re-imposition), measured as ``optimizer.step()`` with no gradients inside the hold.

    .venv/bin/python bench/damage_inject.py              # → bench/results/damage_inject.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from core.damage import (  # noqa: E402
    apply_damage,
    damage_masks,
    hold_damage,
    resolve_targets,
    verify_damage,
)
from core.damage_spec import BitFlip, DamageSpec, FaultSpec, Gaussian, StuckAt  # noqa: E402
from core.masks import PERMUTATIONS  # noqa: E402

TARGET_MS = 50.0
LOCATIONS = {"D4": ["D4"], "D1-D4": ["D1", "D2", "D3", "D4"]}
FAULTS: dict[str, FaultSpec] = {
    "stuck_at": StuckAt(),
    "bit_flip": BitFlip(),
    "gaussian": Gaussian(),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=21).eval()
    load_before = os.getloadavg()
    cases = []
    for where, targets in LOCATIONS.items():
        spec = DamageSpec(targets=targets, fraction=args.fraction, seed=1)
        cases += _location_cases(model, spec, where, args)
        for kind, fault in FAULTS.items():
            if kind != "stuck_at":
                faulty = spec.model_copy(update={"fault": fault})
                cases.append(_inject_case(model, faulty, f"inject {where} {kind}", args))
    for case in cases:
        print(
            f"{case['case']:<24} median {case['median_ms']:8.2f} ms "
            f"[{case['min_ms']:8.2f}, {case['max_ms']:8.2f}]  cpu {case['median_cpu_ms']:8.2f} ms"
        )
    headline = next(c for c in cases if c["case"] == "inject D4 stuck_at")
    report = {
        "benchmark": "damage_inject",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "resnet50 (random init, 21 classes)",
        "fraction": args.fraction,
        "target": f"inject D4 stuck_at median < {TARGET_MS:g} ms",
        "target_ms": TARGET_MS,
        "headline_median_ms": headline["median_ms"],
        "headline_median_cpu_ms": headline["median_cpu_ms"],
        "meets_target": headline["median_ms"] < TARGET_MS,
        "cases": cases,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {"warmup": args.warmup, "repeats": args.repeats},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _location_cases(
    model: nn.Module, spec: DamageSpec, where: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    layers = resolve_targets(model, spec)
    weights = sum(model.get_parameter(f"{n}.weight").numel() for n in layers)
    info = {"layers": len(layers), "weights": weights}
    cases = [
        _inject_case(model, spec, f"inject {where} stuck_at", args),
        _inject_case(model, spec, f"inject {where} stuck_at (cached)", args, cached=True),
        _timed(f"masks {where}", lambda: damage_masks(model, spec), PERMUTATIONS.clear, args)
        | info,
    ]
    damage = apply_damage(model, spec)
    check = verify_damage(model, damage.masks, damage.faults)
    cases.append(
        _timed(
            f"verify {where}", lambda: verify_damage(model, damage.masks, damage.faults), None, args
        )
        | info
        | {"verified": check.ok, "damaged": check.as_dict()["damaged"]}
    )
    reapply = lambda: _reapply(model, damage.faults)  # noqa: E731
    cases.append(_timed(f"restore {where}", damage.restore, reapply, args) | info)
    damage.restore()
    cases.append(_hold_case(model, spec, where, args) | info)
    return cases


def _inject_case(
    model: nn.Module,
    spec: DamageSpec,
    name: str,
    args: argparse.Namespace,
    *,
    cached: bool = False,
) -> dict[str, Any]:
    """``apply_damage`` timed cold (permutations drawn anew each run: a seed seen first) or
    ``cached`` (the permutations of an earlier fraction or job of the same seed are reused)."""
    undo: list[Callable[[], None]] = []

    def inject() -> None:
        undo.append(apply_damage(model, spec).restore)

    def restore() -> None:
        while undo:
            undo.pop()()
        if not cached:
            PERMUTATIONS.clear()

    PERMUTATIONS.clear()
    return _timed(name, inject, restore, args)


def _hold_case(
    model: nn.Module, spec: DamageSpec, where: str, args: argparse.Namespace
) -> dict[str, Any]:
    damage = apply_damage(model, spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        bare = _timed("step", optimizer.step, None, args)
        with hold_damage(model, damage.masks, optimizer):
            held = _timed(f"hold_step {where}", optimizer.step, None, args)
    finally:
        damage.restore()
    for key in ("median_ms", "median_cpu_ms"):
        held[key] = round(held[key] - bare[key], 3)
    held["note"] = "median extra time per optimizer step (post-step re-imposition)"
    return held


def _reapply(model: nn.Module, faults: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, damaged in faults.items():
            model.get_parameter(name).copy_(damaged)


def _timed(
    name: str,
    run: Callable[[], object],
    reset: Callable[[], None] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        run()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if reset is not None:
            reset()
        if i >= args.warmup:
            times.append(elapsed * 1e3)
            cpu_times.append(cpu * 1e3)
    return {
        "case": name,
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "median_cpu_ms": round(statistics.median(cpu_times), 3),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    # Every core this process may use, as a worker would: each layer's shuffle is sequential,
    # but the layers' shuffles run in parallel (core.masks). The CPU time is reported too.
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "bench" / "results" / "damage_inject.json"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
