"""Micro-batching of CAM jobs: many small CAM jobs on one model share forward passes.

A CAM (Eq. 1 of the paper, ``F_c(x, y) = Σ_k w_c^k f^k(x, y)``) comes out of the same forward
pass as the prediction, and that pass costs about as much for one image as for a dozen on a
GPU, or on a CPU once the per-call overhead dominates. When many one-image jobs on one model
arrive together, running them one pass each leaves most of that throughput unused.

How a batch forms. The gateway sends *batchable* CAM jobs — intact-only (no damage, no
retraining: both change the weights), one uploaded image, so a batch holds at most
``cam_batch_max_size`` images (:func:`service.submission.cam_batchable`) — to their own
queue, ``<cam queue>-batch``, which every worker serving CAM jobs also consumes
(``worker/app.py``). The task that receives one of them becomes a batch *leader*: it takes
more messages straight from that queue for up to ``cam_batch_wait_ms`` (:func:`drain`), at
most ``cam_batch_max_size`` jobs, and runs them all.
Jobs whose forward passes can be shared — the same model id and the same CAM options, hence the
same input size, method and explained classes (:func:`batch_key`) — go through
:func:`core.explain.explain` together; every job still runs through
:func:`worker.runtime.run_job` in a thread of its own, so it has its own record, status,
progress, cancellation, artifacts and ``result.json``, written by the task body the unbatched
path runs (``worker.tasks.run_cam``). Only the ``intact`` forward is shared (:class:`Batch`).

Guarantees, the same as one job per task:

* nothing is lost or left waiting on a crash: the leader records each job as it takes it, as
  a member of its own job's batch in the store (:mod:`worker.batch_members`), and acknowledges
  its message at once — the store answers for the job from then on, and the leader's own
  message (acks_late, requeued at once when its pool process dies) for the batch. A leader
  delivered again runs the members it recorded that are not finished, as a batch, before
  anything else and without taking more; a hard time limit fails them with the leader
  (``JobTask.on_failure``). Acknowledging at once, rather than once the jobs finish, means no
  member message comes back after Redis's visibility timeout to run a second time beside the
  leader's rerun (a whole worker lost on Redis). A leader whose own job is not running records
  nobody and takes nobody (a message taken then goes back to the queue). Only a message taken
  by a process that dies before the store write (milliseconds) waits, as any unacknowledged
  task does: Redis's visibility timeout, or the worker's next start (:mod:`worker.recovery`)
  in embedded mode. A job that finished before a crash is not run twice (``run_job`` skips a
  finished job), and a member that kills its process every time fails after ``max_attempts``
  like any job.
* a failing job fails alone: a job whose inputs cannot be read fails before it joins; a
  shared pass that raises is retried job by job (each job's own pass, as unbatched), so only
  the job at fault fails.
* a cancelled job stops: it is checked before it joins and after the pass; its share of the
  pass is dropped and the job ends ``cancelled``.

Why not celery-batches (``Batches`` task base, flush_every / flush_interval): it buffers
requests in the worker's *main* process, so it needs ``worker_prefetch_multiplier`` 0 or above
``flush_every`` for the whole worker — every queue it consumes — which breaks our "one task
reserved per process" rule that keeps long training jobs from queueing behind each other; its
flush timer ticks every ``flush_interval`` instead of waiting from a batch's first job; a
batch is one pool call acknowledged as a whole, with nothing per request when the pool process
dies or for time limits; and every request runs the one task function, with no per-job record
or cancellation. A leader that drains its own queue keeps prefetch 1, acks_late and
reject-on-worker-lost as they are, on both brokers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from PIL import Image

from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.explain import Explanation, explain
from core.progress import Progress, check_stop
from core.resilience import explain_conditions
from service.queue import task_name
from service.settings import Settings
from worker import batch_members
from worker.runtime import JobContext, run_job, services

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: Seconds between looks at an empty batch queue while a leader waits for more jobs.
POLL_INTERVAL = 0.002
#: The stage name the unbatched path reports for the intact pass (core.resilience).
STAGE = "intact"
#: One pass at a time per process: CAM extractors hook the shared cached model, so two
#: concurrent passes on it (members falling back to their own) would mix their features.
_PASS_LOCK = threading.Lock()


class SharedForward(Protocol):
    """What a job body calls instead of its own intact pass: the explanations of its images,
    computed with the other jobs of its batch that share :func:`batch_key`."""

    def __call__(
        self,
        ctx: JobContext,
        model_id: str,
        model: nn.Module,
        meta: CheckpointMeta,
        images: Sequence[tuple[str, Image.Image]],
        options: CamOptions,
    ) -> list[Explanation]: ...


BatchBody = Callable[[JobContext, SharedForward], dict[str, Any]]


def batch_key(model_id: str, options: CamOptions) -> Hashable:
    """Jobs with equal keys can share a forward pass and its post-processing: same weights (ids
    are content digests), so the same preprocessing and input size; same method and explained
    classes; same map post-processing, because :func:`core.explain.explain` applies one
    ``options`` to a whole call."""
    return model_id, options.model_dump_json()


# --- taking more jobs from the batch queue -------------------------------------------------------
_connection: tuple[int, Celery, Connection] | None = None
#: Kombu channels are not thread-safe: with the threads pool, leaders in one process take turns
#: on the shared connection (reentrant: ``take`` acknowledges while drain holds it).
_BROKER_LOCK = threading.RLock()


def _broker(app: Celery) -> Connection:
    """This process's broker connection for draining (opened after the fork, kept between
    batches: one per pool process)."""
    global _connection
    if _connection is None or _connection[0] != os.getpid() or _connection[1] is not app:
        _connection = (os.getpid(), app, app.connection_for_read())
    return _connection[2]


def _forget_broker() -> None:
    global _connection
    if _connection is not None:
        # Already broken: that is why it is dropped.
        with contextlib.suppress(Exception):
            _connection[2].release()
    _connection = None


def drain(
    app: Celery,
    queue: str,
    limit: int,
    wait: float,
    take: Callable[[Message], bool] | None = None,
) -> list[Message]:
    """Up to ``limit`` CAM task messages from ``queue``, taken within ``wait`` seconds (sooner
    when ``limit`` is reached). ``take`` sees each as it is taken: False puts it back and ends
    the wait. The messages are not acknowledged here (``take`` or the caller acks them). A
    broker error ends the wait with what was taken (the leader's own job still runs)."""
    if limit <= 0:
        return []
    with _BROKER_LOCK:
        return _drain(app, queue, limit, time.monotonic() + wait, take)


def _drain(
    app: Celery,
    queue: str,
    limit: int,
    deadline: float,
    take: Callable[[Message], bool] | None,
) -> list[Message]:
    taken: list[Message] = []
    conn = _broker(app)
    try:
        bound = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)(
            conn.default_channel
        )
        # Every pass either takes a message (at most ``limit``), stops, or checks the deadline:
        # messages already waiting are taken even with ``wait`` 0, and nothing loops unbounded.
        while len(taken) < limit:
            message = bound.get(no_ack=False, accept=["json"])
            if message is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(POLL_INTERVAL, left))
                continue
            try:
                if not _keep(message, queue, take):
                    break
            except BaseException:
                # E.g. the soft time limit before take acked it: unacknowledged, the message
                # would sit on this live connection until the visibility timeout.
                _put_back([*taken, message])
                raise
            taken.append(message)
    except (*conn.connection_errors, *conn.channel_errors):
        log.warning("stopped taking jobs from %s: broker error", queue, exc_info=True)
        _forget_broker()
    return taken


def _keep(message: Message, queue: str, take: Callable[[Message], bool] | None) -> bool:
    """Whether drain keeps ``message``; one it does not keep is back in the queue, and the
    leader stops taking: Redis (lpush/rpop) and the embedded broker hand a requeued message
    straight back, so going on would spin on it until the time limit."""
    if message.headers.get("task") != task_name("cam") or not _job_id(message):
        # Not ours to run here (sent by hand?): back to the queue for a normal worker.
        log.warning("put back a non-CAM message found in %s", queue)
        message.requeue()
        return False
    if take is not None and not take(message):
        message.requeue()  # for another leader
        return False
    return True


def _put_back(messages: Sequence[Message]) -> None:
    for message in messages:
        if not message.acknowledged:
            with contextlib.suppress(Exception):  # the connection may be what failed
                message.requeue()


def _job_id(message: Message) -> str | None:
    job_id = message.headers.get("id")
    return job_id if isinstance(job_id, str) else None


def acknowledge(messages: Sequence[Message]) -> None:
    """Ack drained messages; one that cannot be acked comes back later and is skipped then,
    its job being finished."""
    with _BROKER_LOCK:
        for message in messages:
            try:
                message.ack()
            except Exception:
                log.warning("could not acknowledge job %s", _job_id(message), exc_info=True)
                _forget_broker()


# --- one batch -----------------------------------------------------------------------------------
@dataclass
class _Share:
    """One job's part of a batch: its inputs, then its explanations or an error."""

    ctx: JobContext
    key: Hashable
    model: nn.Module
    meta: CheckpointMeta
    images: Sequence[tuple[str, Image.Image]]
    options: CamOptions
    done: threading.Event = field(default_factory=threading.Event)
    explanations: list[Explanation] | None = None
    error: BaseException | None = None
    batch: dict[str, int] = field(default_factory=dict)


class Batch:
    """The jobs of one leader. Each runs in its own thread and hands its inputs to
    :meth:`forward`; the leader's thread waits until every member has done so or ended
    (:meth:`collect`), runs one pass per :func:`batch_key` (:meth:`run`) and hands each member
    its part."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._cond = threading.Condition()
        self._members: set[str] = set()
        self._ended: set[str] = set()
        self._shares: dict[str, _Share] = {}
        self._open = True
        self._abort: BaseException | None = None

    # members' side ---------------------------------------------------------------------------
    def join(self, job_id: str) -> None:
        with self._cond:
            self._members.add(job_id)

    def end(self, job_id: str) -> None:
        """The member's job is over (finished, skipped, or failed before joining the pass)."""
        with self._cond:
            self._ended.add(job_id)
            self._cond.notify_all()

    def forward(
        self,
        ctx: JobContext,
        model_id: str,
        model: nn.Module,
        meta: CheckpointMeta,
        images: Sequence[tuple[str, Image.Image]],
        options: CamOptions,
    ) -> list[Explanation]:
        """:class:`SharedForward`: blocks until the batch's pass has run."""
        check_stop(ctx.should_stop, STAGE)
        ctx.progress(Progress(0.0, STAGE, f"starting {STAGE}"))
        share = _Share(ctx, batch_key(model_id, options), model, meta, images, options)
        with self._cond:
            if self._abort is not None:
                raise self._abort
            self._shares[ctx.job_id] = share
            self._cond.notify_all()
        share.done.wait()
        if share.error is not None:
            raise share.error
        if share.explanations is None:  # the shared pass failed: this job's own, as unbatched
            return _alone(share)
        check_stop(ctx.should_stop, STAGE)
        n = len(images)
        ctx.progress(Progress(1.0, STAGE, f"{n}/{n} images", dict(share.batch)))
        return share.explanations

    # leader's side ---------------------------------------------------------------------------
    def close(self) -> None:
        """No member joins any more."""
        with self._cond:
            self._open = False
            self._cond.notify_all()

    def collect(self) -> list[_Share]:
        """Wait until every member has handed its inputs or ended; their shares."""
        with self._cond:
            self._cond.wait_for(
                lambda: not self._open and self._members <= self._ended | self._shares.keys()
            )
            return [s for job, s in self._shares.items() if job not in self._ended]

    def run(self, shares: Sequence[_Share]) -> None:
        """One :func:`core.explain.explain` call per group of equal keys, split back."""
        groups: dict[Hashable, list[_Share]] = {}
        for share in shares:
            groups.setdefault(share.key, []).append(share)
        for group in groups.values():
            _run_group(group, self.max_size)

    def wait_ended(self) -> None:
        """Wait until every member has ended (:meth:`end`)."""
        with self._cond:
            self._cond.wait_for(lambda: self._members <= self._ended)

    def abort(self, error: BaseException) -> None:
        """Every member waiting, or still to hand its inputs, fails with ``error``."""
        with self._cond:
            self._abort = error
            waiting = [s for s in self._shares.values() if not s.done.is_set()]
        for share in waiting:
            share.error = error
            share.done.set()


def _run_group(group: Sequence[_Share], max_size: int) -> None:
    first = group[0]
    images = [item for share in group for item in share.images]
    started = time.perf_counter()
    try:
        with _PASS_LOCK:
            explanations = explain(
                first.model, first.meta, images, first.options, batch_size=max_size
            )
    except SoftTimeLimitExceeded:
        raise  # the whole batch is out of time (run_batch), not one job at fault
    except Exception:
        # One job's input may be at fault: each job runs its own pass, so only it fails.
        log.warning("a batched pass of %d jobs failed; running them one by one", len(group))
        for share in group:
            share.done.set()
        return
    seconds = time.perf_counter() - started
    log.info(
        "batched CAM pass: %d jobs, %d images, %.3f s (%s)",
        len(group),
        len(images),
        seconds,
        ", ".join(share.ctx.job_id for share in group),
    )
    start = 0
    for share in group:
        share.explanations = explanations[start : start + len(share.images)]
        share.batch = {"batch_size": len(images), "batch_jobs": len(group)}
        start += len(share.images)
        share.done.set()


def _alone(share: _Share) -> list[Explanation]:
    """The job's intact pass exactly as the unbatched path runs it."""
    with _PASS_LOCK:
        conditions = explain_conditions(
            share.model,
            share.meta,
            share.images,
            share.options,
            progress=share.ctx.progress,
            should_stop=share.ctx.should_stop,
        )
    return conditions.explanations["intact"]


# --- the leader ----------------------------------------------------------------------------------
def run_batch(
    app: Celery, settings: Settings, worker: str, leader: str, body: BatchBody
) -> dict[str, Any]:
    """Run job ``leader`` and the batchable jobs that arrive within the wait, each through
    :func:`run_job` with ``body``, recording each in the leader's batch as it is taken; or, when
    the leader is delivered again after its process died, the members it recorded."""
    store = services().store
    batch = Batch(settings.cam_batch_max_size)
    threads: list[threading.Thread] = []
    claimed = threading.Event()

    def start(job_id: str, started: threading.Event | None = None) -> None:
        batch.join(job_id)
        thread = threading.Thread(
            target=_member,
            args=(batch, job_id, worker, body, started),
            name=f"camres-job-{job_id}",
        )
        thread.start()
        threads.append(thread)

    def take(message: Message) -> bool:
        job_id = str(_job_id(message))
        if not batch_members.record(store, leader, job_id, worker):
            return False
        acknowledge([message])  # the store answers for the job now
        start(job_id)
        return True

    again = batch_members.unfinished(store, leader)
    start(leader, claimed)  # its inputs load while the leader waits for company
    try:
        if again is not None:
            log.warning("job %s leads its batch again: %s", leader, ", ".join(again) or "done")
            for job_id in again:
                start(job_id)
        else:
            claimed.wait()  # members are recorded under the leader's job: it must run first
            limit = settings.cam_batch_max_size - 1
            drain(app, settings.cam_batch_queue, limit, settings.cam_batch_wait_ms / 1000, take)
        batch.close()
        batch.run(batch.collect())
    except Exception as exc:  # e.g. the soft time limit: every job still waiting fails with it
        batch.abort(exc)
    finally:
        batch.close()
        _join(batch, threads)
    return {"job": leader, "batch_jobs": len(threads)}


def _join(batch: Batch, threads: Sequence[threading.Thread]) -> None:
    """Wait for every member. The soft time limit may fire while the leader waits here: the
    members must not outlive the task (the pool process takes its next one), so it fails those
    still waiting for the pass, the wait goes on, and the limit is raised once all ended. The
    wait is on the batch, not ``Thread.join``: a join interrupted by the limit's signal marks
    the thread stopped while it runs (CPython 3.11, bpo-45274), and would not wait again."""
    expired: SoftTimeLimitExceeded | None = None
    while True:
        try:
            batch.wait_ended()
            break
        except SoftTimeLimitExceeded as exc:
            batch.abort(exc)
            expired = exc
    for thread in threads:  # each has ended its job: only its last instructions are left
        thread.join()
    if expired is not None:
        raise expired


def _member(
    batch: Batch, job_id: str, worker: str, body: BatchBody, started: threading.Event | None
) -> None:
    def run(ctx: JobContext) -> dict[str, Any]:
        if started is not None:
            started.set()  # the job is running in the store
        return body(ctx, batch.forward)

    try:
        run_job(job_id, worker, run)
    except Exception:  # the store failed under run_job; the job stays for recovery
        log.exception("job %s of a batch could not be run", job_id)
    finally:
        if started is not None:
            started.set()  # skipped, refused or failed before its body: the leader goes on
        batch.end(job_id)
