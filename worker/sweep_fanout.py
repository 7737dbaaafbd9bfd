"""Sweep jobs, whole or fanned out across workers (paper §4.2: every location × fraction ×
trial cell of a damage sweep is independent of the others, so the cells can run anywhere).

**Whole.** One task computes every cell (:func:`compute`) and writes the report
(:func:`publish`): rows appended to ``sweep_cells.jsonl`` as they finish, per-cell progress,
cancellation between cells.

**Fanned out.** With a Redis broker and more than one live worker on the sweep's queue
(heartbeats in the job store, as ``/readyz`` reads them), the ``camres.sweep`` task becomes a
dispatcher (:func:`dispatch`): it splits the config (:meth:`core.sweep_spec.SweepConfig.split`;
the location is the shard, fraction ranges when there are more workers than locations;
setting ``sweep_fanout``), records the plan as the job's *parts* in the store, and sends one
``camres.sweep_part`` task per part as a Celery ``group``. Each part (:func:`run_part`)
computes its cells with the same core code into ``sweep_part.<part>.json`` (rows, the worker's
hostname, seconds) and its own ``sweep_cells.<part>.jsonl`` (one writer per file: no appends
from several hosts to one file on a shared volume); its progress goes to its own entry and the
job's progress is the parts' combined, weighted by cells (:meth:`JobStore.set_part_progress`).
The part that marks the last part done merges (:func:`core.sweep_report.merge_reports`): the
same ``sweep.json``, CSVs, plots and ``sweep_cells.jsonl`` the whole run writes, rows in
location, fraction, trial order, and finishes the job.

Why the job store coordinates the merge, not a ``chord`` on a result backend: a chord needs a
result backend (Celery's Redis backend counts the parts that returned and sends the callback
from the worker that returned last), i.e. a second copy of job state next to the store, with
its own expiry, keys and failure modes, and it would still leave the job store to update:

* a part that raises makes the chord callback fail with ``ChordError`` instead of running it,
  so the job's failure would need an errback; here the failing part finishes the job
  ``failed`` with its reason, and the others see the job finished at their next check between
  cells and stop;
* the chord callback is sent once, by whichever worker joins last; Celery 5.7 guards that
  with a claim key that expires, and documents that a slow join can dispatch twice. Here the
  merge runs inside the last part's own task, under ``acks_late`` and
  ``reject_on_worker_lost``: if that process dies, the task is redelivered, finds its part
  result on the volume, marks it done again (idempotent) and merges again (the files are
  replaced atomically); the job finishes exactly once because :meth:`JobStore.finish` is a
  compare-and-set;
* results stay files on the shared volume the artifacts need anyway, instead of going through
  Redis; the gateway, the embedded deployment and ``task_ignore_result`` stay as they are.

Redelivery: a part whose worker dies is run again from the start (its report is written only
when complete); a part whose runs keep killing workers fails the job after ``max_attempts``;
a dispatcher redelivered after declaring the plan never runs the sweep whole beside it, however
many workers are live now: it re-sends only the parts no worker has started (their message may
have been lost with it; a duplicate run of a part writes the same files), as the parts started
are redelivered by the broker themselves. Parts computing on different hardware may
differ in the last bits; merged results equal the whole run's on like workers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded
from celery import group

from core.exceptions import CamresError, CancelledError
from core.figures import plot_accuracy, plot_drift
from core.progress import Progress
from core.sweep import run_sweep
from core.sweep_report import JsonlWriter, merge_reports, write_report
from core.sweep_spec import SweepConfig, SweepReport, SweepRow
from service.queue import task_name
from service.schemas import SweepJobResult, SweepJobSpec
from service.settings import Settings
from service.store import JobError, JobProgress, JobStore, PartState
from worker import loading
from worker.app import celery_app
from worker.runtime import JobContext, error_of, lost_worker_error, services

log = logging.getLogger(__name__)

#: Task of one part of a fanned-out sweep.
PART_TASK = task_name("sweep_part")
#: The sweep's rows so far, one JSON document per line, readable while the job runs.
CELLS_JSONL = "sweep_cells.jsonl"

T = TypeVar("T")


def part_jsonl(part: str) -> str:
    """Rows of one part so far (fanned-out sweeps)."""
    return f"sweep_cells.{part}.jsonl"


def part_report(part: str) -> str:
    """A finished part's report, worker and timing."""
    return f"sweep_part.{part}.json"


# --- computing and publishing a sweep --------------------------------------------------------
def compute(ctx: JobContext, spec: SweepJobSpec, config: SweepConfig, jsonl: Path) -> SweepReport:
    """Run the cells of ``config`` (all of ``spec.config`` or a part of it) on the job's model
    and images; rows go to ``jsonl`` as they finish, progress carries ``rows`` written."""
    # run_sweep damages the cached model in place cell by cell and restores it bit for bit
    # (also on errors and cancellation); retraining works on copies.
    model, checkpoint = loading.cached(ctx, spec.model)
    eval_set, retrain_data = loading.sweep_inputs(ctx, spec, checkpoint.meta)
    partial = JsonlWriter(jsonl)
    rows = 0

    def on_cell(row: SweepRow) -> None:
        nonlocal rows
        partial(row)
        rows += 1

    def progress(p: Progress) -> None:
        # "rows" tells a client how many lines of the partial artifact are complete.
        ctx.progress(Progress(p.fraction, p.stage, p.message, {**p.metrics, "rows": rows}))

    result = run_sweep(
        model,
        checkpoint.meta.arch,
        eval_set,
        config,
        retrain_data=retrain_data,
        progress=progress,
        should_stop=ctx.should_stop,
        on_cell=on_cell,
    )
    return result.report(checkpoint.meta.classes, model=spec.model, dataset=spec.dataset)


def publish(ctx: JobContext, report: SweepReport) -> dict[str, Any]:
    """Write the report's tables and plots; the job's result (``sweep_cells.jsonl`` is
    already there)."""
    written = write_report(report, ctx.artifacts)
    written["accuracy_png"] = plot_accuracy(report, ctx.artifacts / "accuracy.png")
    written["drift_png"] = plot_drift(report, ctx.artifacts / "drift.png")
    written["cells_jsonl"] = ctx.artifacts / CELLS_JSONL
    return SweepJobResult(
        arch=report.arch,
        classes=report.classes,
        images=report.images,
        intact_accuracy=report.intact_accuracy,
        cells=len(report.rows),
        seconds=report.seconds,
        summary=report.summary,
        artifacts={kind: path.name for kind, path in written.items()},
    ).model_dump(mode="json")


# --- when to fan out ---------------------------------------------------------------------------
def live_workers(settings: Settings, store: JobStore) -> list[str]:
    """Workers whose heartbeat is fresh (as ``/readyz`` counts them) and that consume the
    sweep's queue (a heartbeat without queue information counts)."""
    queue = settings.queue_for("sweep")
    now = time.time()
    return [
        beat.name
        for beat in store.workers()
        if beat.age(now) <= settings.heartbeat_max_age and queue in beat.info.get("queues", [queue])
    ]


def part_count(settings: Settings, store: JobStore) -> int:
    """How many parts a sweep is split into now: 1 (whole) in the embedded deployment (one
    worker), with ``sweep_fanout = 1``, or with fewer than two live workers; else one per live
    worker (``"auto"``) or the configured number."""
    if settings.embedded or settings.sweep_fanout == 1:
        return 1
    live = len(live_workers(settings, store))
    if live < 2:
        return 1
    return live if settings.sweep_fanout == "auto" else settings.sweep_fanout


def _index(item: tuple[str, PartState]) -> int:
    return int(item[1].spec.get("index", 0))


def plan_parts(configs: list[SweepConfig]) -> dict[str, PartState]:
    """The parts of a split sweep as the store keeps them: ``p<i>`` → its locations and
    fractions, weighted by its work units (progress)."""
    return {
        f"p{i}": PartState(
            spec={"index": i, "locations": c.locations, "fractions": c.fractions},
            weight=c.units,
        )
        for i, c in enumerate(configs)
    }


def dispatch(job_id: str, worker: str) -> dict[str, Any] | None:
    """Split sweep ``job_id`` into parts and send them; None when it should run whole (not
    worth splitting, or not startable: the whole run then reports why)."""
    svc = services()
    if svc.store.parts(job_id):  # delivered again: the plan stands
        return _resend(job_id)
    count = part_count(svc.settings, svc.store)
    if count < 2:
        return None
    record = svc.store.get(job_id)
    if record is None or record.finished:
        return None
    try:
        configs = SweepJobSpec.model_validate(record.spec).config.split(count)
    except (ValueError, CamresError):  # pydantic's ValidationError is a ValueError
        return None
    if len(configs) < 2:
        return None
    started = svc.store.start(job_id, worker)
    if started is None:
        return None
    limit = svc.settings.max_attempts
    if started.attempts > limit:
        svc.store.finish(job_id, "failed", error=lost_worker_error(started.attempts - 1, limit))
        return {"job": job_id, "status": "failed"}
    states = svc.store.declare_parts(job_id, plan_parts(configs))
    if states is None:
        return {"job": job_id, "status": "skipped"}
    return _send(job_id, states)


def _resend(job_id: str) -> dict[str, Any]:
    """A dispatcher delivered again (its worker died after declaring the plan): send the parts
    no worker started; a started part's own message is redelivered if its worker dies."""
    store = services().store
    record = store.get(job_id)
    if record is None or record.finished:
        return {"job": job_id, "status": "skipped"}
    states = store.parts(job_id)
    unstarted = {name: s for name, s in states.items() if s.attempts == 0 and not s.done}
    return _send(job_id, unstarted)


def _send(job_id: str, states: dict[str, PartState]) -> dict[str, Any]:
    svc = services()
    pending = [name for name, state in sorted(states.items(), key=_index) if not state.done]
    queue = svc.settings.queue_for("sweep")
    if pending:
        try:
            group(
                celery_app.signature(PART_TASK, args=(job_id, name), queue=queue, immutable=True)
                for name in pending
            ).apply_async()
        except Exception as exc:  # the broker refused: no part will ever finish the job
            svc.store.finish(job_id, "failed", error=error_of(exc))
            raise
    log.info("sweep %s: sent %d parts on %s", job_id, len(pending), queue)
    return {"job": job_id, "status": "dispatched", "parts": pending}


# --- one part ------------------------------------------------------------------------------------
@dataclass
class PartContext(JobContext):
    """A job context for one part: progress goes to the part's entry (the store combines the
    parts'), and the part stops once the job was cancelled *or finished* (another part
    failed)."""

    part: str = ""

    def _write(self, progress: JobProgress) -> None:
        metrics = {**progress.metrics, "part": self.part}
        update = progress.model_copy(update={"metrics": metrics})
        self.services.store.set_part_progress(self.job_id, self.part, update)
        self._written_fraction = progress.fraction

    def should_stop(self) -> bool:
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.services.settings.cancel_poll_interval:
            self._last_cancel_check = now
            record = self.services.store.get(self.job_id)
            self._cancelled = record is None or record.finished or record.cancel_requested
        return self._cancelled


def _guarded(job_id: str, action: Callable[[], T]) -> tuple[T | None, str, JobError | None]:
    """Run ``action``: (value, "ok", None), or how the job must end: cancelled or failed with
    the reason (a part's failure must not take the worker down)."""
    try:
        return action(), "ok", None
    except CancelledError:
        return None, "cancelled", None
    except SoftTimeLimitExceeded:
        limit = services().settings.task_soft_time_limit
        error = JobError(type="TimeLimitExceeded", message=f"a part ran longer than {limit} s")
        return None, "failed", error
    except Exception as exc:
        if not isinstance(exc, CamresError):
            log.exception("sweep %s failed", job_id)
        return None, "failed", error_of(exc)


def run_part(job_id: str, part: str, worker: str) -> dict[str, Any]:
    """Compute one part of sweep ``job_id``; the part that completes the set merges and
    finishes the job. Returns a small summary for Celery's logs."""
    svc = services()
    summary: dict[str, Any] = {"job": job_id, "part": part, "worker": worker}
    state = svc.store.start_part(job_id, part, worker)
    record = svc.store.get(job_id) if state is not None else None
    if state is None or record is None:
        return {**summary, "status": "skipped"}
    limit = svc.settings.max_attempts
    if state.attempts > limit:
        svc.store.finish(job_id, "failed", error=lost_worker_error(state.attempts - 1, limit))
        return {**summary, "status": "failed"}
    ctx = PartContext(record=record, services=svc, part=part)
    spec, status, error = _guarded(job_id, lambda: SweepJobSpec.model_validate(record.spec))
    if spec is not None:
        _, status, error = _guarded(job_id, lambda: _compute_part(ctx, spec, state, worker))
    if spec is None or status != "ok":
        svc.store.finish(job_id, "cancelled" if status == "cancelled" else "failed", error=error)
        return {**summary, "status": status}
    states = svc.store.finish_part(job_id, part)
    if states is None or not all(s.done for s in states.values()):
        return {**summary, "status": "done"}
    result, status, error = _guarded(job_id, lambda: _merge(ctx, spec, states))
    if status != "ok":
        svc.store.finish(job_id, "failed", error=error)
        return {**summary, "status": status}
    svc.store.finish(job_id, "succeeded", result=result)
    return {**summary, "status": "merged"}


def _compute_part(ctx: PartContext, spec: SweepJobSpec, state: PartState, worker: str) -> None:
    path = ctx.artifacts / part_report(ctx.part)
    if path.exists():  # redelivered after its report was written: only the merge is left
        return
    started = time.perf_counter()
    config = spec.config.subset(state.spec["locations"], state.spec["fractions"])
    report = compute(ctx, spec, config, ctx.artifacts / part_jsonl(ctx.part))
    document = {
        "part": ctx.part,
        "worker": worker,
        "locations": config.locations,
        "fractions": config.fractions,
        "seconds": time.perf_counter() - started,
        "report": report.model_dump(mode="json"),
    }
    _replace(ctx, path, json.dumps(document, indent=2) + "\n")


def _merge(ctx: PartContext, spec: SweepJobSpec, states: dict[str, PartState]) -> dict[str, Any]:
    ctx.services.store.set_progress(
        ctx.job_id, JobProgress(fraction=1.0, stage="merge", message=f"{len(states)} parts")
    )
    names = [name for name, _ in sorted(states.items(), key=_index)]
    documents = [
        json.loads((ctx.artifacts / part_report(name)).read_text(encoding="utf-8"))
        for name in names
    ]
    reports = [SweepReport.model_validate(doc["report"]) for doc in documents]
    started = ctx.record.started_at
    report = merge_reports(
        spec.config, reports, seconds=None if started is None else max(time.time() - started, 0.0)
    )
    _replace(
        ctx, ctx.artifacts / CELLS_JSONL, "".join(r.model_dump_json() + "\n" for r in report.rows)
    )
    result = publish(ctx, report)
    result["parts"] = [
        {key: doc[key] for key in ("part", "worker", "locations", "fractions", "seconds")}
        | {"cells": len(doc["report"]["rows"])}
        for doc in documents
    ]
    return result


def _replace(ctx: JobContext, path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a reader, or a redelivered part, never sees half)."""
    tmp = ctx.services.settings.tmp_dir / f"{ctx.job_id}.{path.name}.{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
