"""Damage sweeps (Vasu & Savakis §4.2): accuracy and CAM drift of a network damaged at each
location and fraction, over several trials, optionally after masked retraining.

Every cell (location, fraction, trial) damages the *same* model in place with
:func:`core.damage.damaged` — the intact weights are restored bit for bit when the cell ends, also
on errors and cancellation — and compares the damaged network with the intact one on the same
images: accuracy, label-flip rate and the drift of its CAMs (:mod:`core.drift`).

Two strategies give identical results (same predictions, same maps, bit for bit):

* ``"fast"`` — what damage cannot change is computed once. The intact predictions and maps are
  computed once per sweep. For each location the network is cut before its first damaged layer
  (:mod:`core.sweep_stages`); the activations at the cut are computed once per image and every
  cell of the location reruns only the rest. To bound memory the images are processed in chunks
  whose cached activations fit ``config.cache_mb`` (float32, never reduced: results must not
  change); each chunk goes through all cells of the location before the next is computed.
* ``"naive"`` — the reference: every cell on its own, as an independent job would run it: a deep
  copy of the model, damaged, and a full forward pass of the intact and the damaged network over
  every image.

Batches are the same in both (``config.batch_size`` consecutive images), so kernels see the same
shapes and give the same bits. Progress is reported per evaluated cell (metrics ``location``,
``fraction``, ``trial``), finished rows go to ``on_cell`` as soon as they are complete, and
``should_stop`` is polled before every cell (:class:`~core.exceptions.CancelledError`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from core.damage import apply_damage, retrain
from core.exceptions import InputError
from core.hooks import eval_mode
from core.models import get_arch
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.sweep_data import EvalSet, RetrainData, balanced_subset
from core.sweep_engine import (
    RUNNERS,
    Cell,
    CellKey,
    CellOutput,
    Evaluated,
    Explainer,
    Reference,
    SweepContext,
    device_of,
)
from core.sweep_report import summarize
from core.sweep_spec import SummaryRow, SweepConfig, SweepReport, SweepRow

__all__ = [
    "CellKey",
    "CellOutput",
    "EvalSet",
    "RetrainData",
    "Strategy",
    "SweepResult",
    "balanced_subset",
    "run_sweep",
]

Strategy = Literal["fast", "naive"]
RowCallback = Callable[[SweepRow], None]


@dataclass
class SweepResult:
    """A finished sweep: rows sorted by location (config order), fraction and trial, and the raw
    outputs behind them. ``retrained_models`` holds the retrained networks asked for with
    ``keep_retrained`` (e.g. for the Figure 5 grid). ``timings`` are seconds spent in:
    ``intact_s`` (the intact pass), ``cells_<location>_s`` (a location's cells, their metrics
    included), ``metrics_s`` (all metrics), ``retrain_s`` and, for the naive strategy,
    ``naive_intact_s`` (the intact pass it repeats in every cell)."""

    config: SweepConfig
    arch: str
    strategy: Strategy
    intact: CellOutput
    intact_accuracy: float
    rows: list[SweepRow]
    outputs: dict[CellKey, CellOutput]
    retrained_outputs: dict[CellKey, CellOutput] = field(default_factory=dict)
    retrained_models: dict[CellKey, nn.Module] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> list[SummaryRow]:
        return summarize(self.rows, self.config.confidence)

    def report(self, classes: Sequence[str], **provenance: str) -> SweepReport:
        return SweepReport(
            config=self.config,
            arch=self.arch,
            classes=list(classes),
            images=int(self.intact.predictions.numel()),
            intact_accuracy=self.intact_accuracy,
            strategy=self.strategy,
            seconds=self.seconds,
            rows=self.rows,
            summary=self.summary(),
            provenance=dict(provenance),
        )


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    model: nn.Module,
    arch: str,
    eval_set: EvalSet,
    config: SweepConfig,
    *,
    strategy: Strategy = "fast",
    retrain_data: RetrainData | None = None,
    keep_retrained: Collection[CellKey] = (),
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
    on_cell: RowCallback | None = None,
) -> SweepResult:
    """Sweep ``model`` (architecture ``arch``, on its current device) over ``config``'s
    locations × fractions × trials on ``eval_set``; see the module docstring.

    With ``config.retrain_at`` every cell at those fractions is also retrained (a deep copy,
    :func:`core.damage.retrain` on ``retrain_data``) and compared again; its row is passed to
    ``on_cell`` once retrained. ``model``'s weights and train/eval flags are as before when this
    returns or raises.
    """
    if strategy not in RUNNERS:
        raise InputError(f"unknown strategy {strategy!r}; use fast or naive", field="strategy")
    if config.retrain_at and retrain_data is None:
        raise InputError("retrain_at needs retrain_data (training images)", field="retrain_at")
    started = time.perf_counter()
    ctx = SweepContext(model, get_arch(arch), eval_set, config, progress, should_stop)
    rows: list[SweepRow] = []
    outputs: dict[CellKey, CellOutput] = {}
    result = SweepResult(config, arch, strategy, *_intact(ctx), rows=rows, outputs=outputs)
    reference = ctx.reference(result.intact)
    runner = RUNNERS[strategy](ctx)
    with eval_mode(model):
        for location in config.locations:
            location_started = time.perf_counter()
            held: list[tuple[Cell, SweepRow]] = []
            for evaluated in runner.run(location, ctx.cells(location), reference):
                outputs[evaluated.cell.key] = evaluated.output
                row = _row(ctx, evaluated)
                if evaluated.cell.key.fraction in config.retrain_at:
                    held.append((evaluated.cell, row))
                else:
                    _emit(rows, row, on_cell)
            ctx.add_time(f"cells_{location}_s", time.perf_counter() - location_started)
            for cell, row in held:
                assert retrain_data is not None  # checked above
                row = _retrained(ctx, cell, row, reference, retrain_data, result, keep_retrained)
                _emit(rows, row, on_cell)
    order = {location: i for i, location in enumerate(config.locations)}
    rows.sort(key=lambda r: (order[r.location], r.fraction, r.trial))
    result.seconds = time.perf_counter() - started
    result.timings = ctx.timings
    return result


def _intact(ctx: SweepContext) -> tuple[CellOutput, float]:
    report(ctx.progress, Progress(0.0, "intact", "intact network"))
    started = time.perf_counter()
    with eval_mode(ctx.model):
        output = Explainer(ctx, ctx.model).over_all(ctx.device)
    ctx.add_time("intact_s", time.perf_counter() - started)
    accuracy = float((output.predictions == ctx.eval_set.labels).double().mean())
    return output, accuracy


def _row(ctx: SweepContext, evaluated: Evaluated) -> SweepRow:
    key, spec = evaluated.cell.key, evaluated.cell.spec
    metrics = ctx.metrics(evaluated.output, evaluated.reference)
    return SweepRow(
        location=key.location,
        fraction=key.fraction,
        trial=key.trial,
        seed=spec.seed,
        damaged_weights=evaluated.damaged_weights,
        target_weights=evaluated.target_weights,
        **metrics.model_dump(),
    )


def _emit(rows: list[SweepRow], row: SweepRow, on_cell: RowCallback | None) -> None:
    rows.append(row)
    if on_cell is not None:
        on_cell(row)


def _retrained(
    ctx: SweepContext,
    cell: Cell,
    row: SweepRow,
    reference: Reference,
    data: RetrainData,
    result: SweepResult,
    keep: Collection[CellKey],
) -> SweepRow:
    """Masked retraining of a damaged copy (paper §3.2), then the same comparison."""
    check_stop(ctx.should_stop, "sweep")
    started = time.perf_counter()
    network = copy.deepcopy(ctx.model)
    damage = apply_damage(network, cell.spec)
    base = ctx.done_units

    def relay(p: Progress) -> None:
        ctx.done_units = base + p.fraction
        ctx.advance(0.0, "retrain", cell.key, **p.metrics)

    trained = retrain(
        network,
        damage.masks,
        data.train,
        data.val,
        ctx.config.retrain,
        progress=relay,
        should_stop=ctx.should_stop,
    )
    network.eval()
    output = Explainer(ctx, network).over_all(device_of(network))
    ctx.done_units = base
    ctx.advance(1.0, "retrain", cell.key)
    result.retrained_outputs[cell.key] = output
    if cell.key in keep:
        result.retrained_models[cell.key] = network
    ctx.add_time("retrain_s", time.perf_counter() - started)
    return row.model_copy(
        update={"retrained": ctx.metrics(output, reference), "retrain_epochs": trained.epochs_run}
    )
