"""The Celery worker application: ``celery -A worker.app:celery_app worker`` (or
``camres worker``). Configuration comes from :func:`service.queue.make_celery`, shared with the
gateway; the tasks live in :mod:`worker.tasks`.

Process signals:

* ``worker_init`` (main process, before consuming): create the data folders; in the embedded
  deployment, recover the jobs a crash left behind (:mod:`worker.recovery`).
* ``celeryd_after_setup`` (main process, after ``--queues`` applied): consume the queue of
  batchable CAM jobs too (:mod:`worker.batching`).
* ``worker_process_init`` (each pool process, after the fork): choose the compute device and
  the number of torch threads. This is the first place CUDA (or torch at all) may be touched.
* ``worker_ready`` (main process): start the heartbeat the gateway's ``/readyz`` reads, and
  the periodic deletion of expired jobs (:mod:`service.retention`).
* ``worker_shutdown`` (main process): stop both.

Thread rule (:func:`core.engine.thread_count`): the cores the worker may use
(``sched_getaffinity``) divided by the pool's concurrency, at least 1 — ``--concurrency 2`` on
8 cores gives each prefork child 4 threads, so the pool never has more busy threads than cores.
``CAMRES_THREADS`` (else a plain ``OMP_NUM_THREADS``) overrides it per process. The parent
never imports torch (forked children would inherit its OpenMP state); with the threads pool,
whose tasks share the parent, the parent applies the same rule at start-up. The solo pool
runs one task at a time in the parent, whatever ``--concurrency`` says (Celery's default is
the CPU count), and Celery sends ``worker_process_init`` there when it creates the pool
(celery/celery#5562, Celery 4.4): the rule applies with a concurrency of 1.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from service.queue import make_celery
from service.retention import purge_expired
from service.settings import get_settings
from worker import runtime
from worker.recovery import recover_embedded

log = logging.getLogger(__name__)

celery_app: Celery = make_celery(get_settings(), include=("worker.tasks",))

_background: list[runtime.Periodic] = []
#: Tasks this worker runs at once (its pool's concurrency), read at ``worker_init``; forked
#: pool processes inherit it.
_concurrency = 1


@signals.worker_init.connect
def _prepare(sender: Any = None, **_: Any) -> None:
    # Before the consumer starts: the embedded broker's folders must exist, and a job this
    # worker starts must not be mistaken for one its previous run left behind.
    global _concurrency
    settings = get_settings()
    settings.ensure_dirs()
    concurrency = getattr(sender, "concurrency", None)
    _concurrency = concurrency if isinstance(concurrency, int) and concurrency > 0 else 1
    pool = str(getattr(sender, "pool_cls", "")).lower()  # the --pool alias, or a class
    if "solo" in pool:
        _concurrency = 1
    if "thread" in pool:
        _apply_threads()
    name = getattr(sender, "hostname", None)
    if settings.embedded and name:
        recover_embedded(runtime.services().store, settings, name)


@signals.celeryd_after_setup.connect
def _consume_batch_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # A worker that serves CAM jobs also serves the batchable ones (service.queue.send_job
    # routes them to their own queue), whatever its --queues say, so batching needs no change
    # to how workers are started. The queue is consumed even with batching off here: a
    # gateway with it on must still find a worker for those jobs.
    settings = get_settings()
    queues = instance.app.amqp.queues
    selected = queues.consume_from  # None: every declared queue, the batch queue included
    if selected is not None and settings.queue_for("cam") in selected:
        queues.select_add(settings.cam_batch_queue)


@signals.worker_process_init.connect
def _init_process(**_: Any) -> None:
    runtime.select_device(get_settings().device)
    _apply_threads()


def _apply_threads() -> None:
    from core.engine import apply_thread_policy, env_threads  # torch: not in the parent

    threads = apply_thread_policy(_concurrency, env_threads(os.environ))
    log.info("worker process %d: %d torch threads", os.getpid(), threads)


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    svc = runtime.services()
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    task_consumer = getattr(sender, "task_consumer", None)
    queues = sorted(q.name for q in getattr(task_consumer, "queues", []))
    _background.append(
        runtime.Heartbeat(
            svc.store,
            name,
            svc.settings.heartbeat_interval,
            {"pid": os.getpid(), "queues": queues},
        )
    )
    if svc.settings.result_ttl:
        _background.append(
            runtime.Periodic(
                "camres-retention",
                svc.settings.retention_interval,
                lambda: purge_expired(svc.store, svc.settings),
            )
        )
    for thread in _background:
        thread.start()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    while _background:
        _background.pop().stop()
