"""Sweep tables: trials combined into means with confidence intervals, written as JSON, CSV and
JSON Lines. Torch-free.

Confidence intervals: the ``n`` trials of a (location, fraction) are independent draws of the
damaged weights, so a metric's mean is given with the two-sided Student-t interval

    mean ± t_{(1 + c)/2, n − 1} · s / √n

where ``s`` is the sample standard deviation (n − 1 in the denominator) and ``c`` the confidence
level (0.95 by default), intersected with the range the metric can take (:data:`BOUNDS`; the
true mean lies in it for certain, so coverage is kept). It describes the variability *over
damage draws* on a fixed image set, not the sampling error of the images. With a single trial
there is no interval. Few trials give wide intervals: t = 12.7 for two, 4.3 for three.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from core.exceptions import InputError
from core.sweep_spec import (
    DRIFT_METRICS,
    CellMetrics,
    Estimate,
    SummaryRow,
    SweepConfig,
    SweepReport,
    SweepRow,
)

__all__ = [
    "BOUNDS",
    "METRICS",
    "JsonlWriter",
    "mean_ci",
    "merge_reports",
    "read_rows_jsonl",
    "row_record",
    "summarize",
    "summary_record",
    "write_report",
]

log = logging.getLogger(__name__)

#: Per-cell metrics, in table order; after retraining each also appears as ``retrained_<name>``.
METRICS: tuple[str, ...] = ("accuracy", "flip_rate", *DRIFT_METRICS)

#: The range each metric lies in (confidence intervals are clipped to it).
BOUNDS: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "flip_rate": (0.0, 1.0),
    "cam_correlation": (-1.0, 1.0),
    "har_box_iou": (0.0, 1.0),
    "mask_iou": (0.0, 1.0),
    "peak_shift_px": (0.0, math.inf),
}

#: Files :func:`write_report` writes into the output folder.
REPORT_JSON = "sweep.json"
SUMMARY_CSV = "sweep_summary.csv"
CELLS_CSV = "sweep_cells.csv"


def mean_ci(
    values: Iterable[float | None],
    confidence: float = 0.95,
    *,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Estimate:
    """Mean of the finite ``values`` (None and NaN are skipped) with its Student-t interval,
    intersected with ``bounds``, the range the metric cannot leave (a rate lies in [0, 1]): the
    true mean lies in that range for certain, so the clipped interval keeps its coverage."""
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence}", field="confidence")
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Estimate(mean=None, n=0)
    mean = math.fsum(xs) / n
    if n < 2:
        return Estimate(mean=mean, n=n)
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * statistics.stdev(xs) / math.sqrt(n)
    low, high = bounds
    return Estimate(mean=mean, ci_low=max(mean - half, low), ci_high=min(mean + half, high), n=n)


def summarize(rows: Sequence[SweepRow], confidence: float = 0.95) -> list[SummaryRow]:
    """One :class:`SummaryRow` per (location, fraction), in the order rows first show them."""
    groups: dict[tuple[str, float], list[SweepRow]] = {}
    for row in rows:
        groups.setdefault((row.location, row.fraction), []).append(row)
    summary = []
    for (location, fraction), members in groups.items():
        metrics = {m: _estimate(members, m, confidence) for m in METRICS}
        retrained = [r.retrained for r in members if r.retrained is not None]
        if retrained:
            for m in METRICS:
                metrics[f"retrained_{m}"] = _estimate(retrained, m, confidence)
        summary.append(
            SummaryRow(location=location, fraction=fraction, trials=len(members), metrics=metrics)
        )
    return summary


def _estimate(rows: Sequence[CellMetrics], metric: str, confidence: float) -> Estimate:
    return mean_ci((getattr(r, metric) for r in rows), confidence, bounds=BOUNDS[metric])


def merge_reports(
    config: SweepConfig, parts: Sequence[SweepReport], *, seconds: float | None = None
) -> SweepReport:
    """One report for ``config`` from the reports of its parts (:meth:`SweepConfig.split`),
    as the unsplit sweep would have written it: rows in location (config order), fraction and
    trial order, the summary recomputed from them. ``seconds`` defaults to the longest part.

    Every cell of ``config`` must come from exactly one part, and the parts must have seen the
    same network and images (:class:`InputError` on ``parts`` otherwise). Each part measured
    the intact network itself; the first part's intact accuracy is kept (parts computing on
    different hardware may differ in the last bits; that is logged)."""
    if not parts:
        raise InputError("no part to merge", field="parts")
    first = parts[0]
    for part in parts[1:]:
        seen = (part.arch, part.classes, part.images, part.strategy)
        if seen != (first.arch, first.classes, first.images, first.strategy):
            raise InputError(
                "parts disagree on the network or images (arch, classes, images, strategy): "
                f"{seen} vs {(first.arch, first.classes, first.images, first.strategy)}",
                field="parts",
            )
        if part.intact_accuracy != first.intact_accuracy:
            log.warning(
                "sweep parts measured different intact accuracies: %s vs %s",
                part.intact_accuracy,
                first.intact_accuracy,
            )
    order = {location: i for i, location in enumerate(config.locations)}
    rows = sorted(
        (row for part in parts for row in part.rows),
        key=lambda r: (order.get(r.location, len(order)), r.fraction, r.trial),
    )
    keys = [(r.location, r.fraction, r.trial) for r in rows]
    expected = {
        (location, fraction, trial)
        for location in config.locations
        for fraction in config.fractions
        for trial in range(config.trials)
    }
    if len(set(keys)) != len(keys) or set(keys) != expected:
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
        raise InputError(
            f"parts do not cover the sweep's cells once: missing {missing[:5]}, repeated "
            f"{repeated[:5]}, foreign {extra[:5]}",
            field="parts",
        )
    return first.model_copy(
        update={
            "config": config,
            "seconds": max(p.seconds for p in parts) if seconds is None else seconds,
            "rows": rows,
            "summary": summarize(rows, config.confidence),
        }
    )


def row_record(row: SweepRow) -> dict[str, Any]:
    """A cell as one flat record (CSV columns): retrained metrics as ``retrained_<name>``."""
    record = row.model_dump(exclude={"retrained"})
    for m in METRICS:
        record[f"retrained_{m}"] = None if row.retrained is None else getattr(row.retrained, m)
    return record


def summary_record(row: SummaryRow) -> dict[str, Any]:
    """A summary row as one flat record: ``<metric>_mean``, ``_ci_low``, ``_ci_high``."""
    record: dict[str, Any] = {
        "location": row.location,
        "fraction": row.fraction,
        "trials": row.trials,
    }
    for name, estimate in row.metrics.items():
        record[f"{name}_mean"] = estimate.mean
        record[f"{name}_ci_low"] = estimate.ci_low
        record[f"{name}_ci_high"] = estimate.ci_high
    return record


def write_report(report: SweepReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``sweep.json`` (the whole report), ``sweep_summary.csv`` (one row per location and
    fraction) and ``sweep_cells.csv`` (one row per location, fraction and trial) into
    ``out_dir``; returns kind → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / REPORT_JSON,
        "summary_csv": out / SUMMARY_CSV,
        "cells_csv": out / CELLS_CSV,
    }
    paths["json"].write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _write_csv(paths["summary_csv"], [summary_record(r) for r in report.summary])
    _write_csv(paths["cells_csv"], [row_record(r) for r in report.rows])
    return paths


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


class JsonlWriter:
    """An ``on_cell`` callback appending each finished row to a JSON Lines file, flushed at once,
    so partial results of a running sweep can be read (:func:`read_rows_jsonl`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")

    def __call__(self, row: SweepRow) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(row.model_dump_json() + "\n")


def read_rows_jsonl(path: str | Path) -> list[SweepRow]:
    """The rows written so far by :class:`JsonlWriter` (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(SweepRow.model_validate(json.loads(line)))
        except ValueError:  # a line being written while we read; JSONDecodeError, pydantic
            continue
    return rows
