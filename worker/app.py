"""The Celery worker application: ``celery -A worker.app:celery_app worker`` (or
``camres worker``). Configuration comes from :func:`service.queue.make_celery`, shared with the
gateway; the tasks live in :mod:`worker.tasks`.

Process signals:

* ``worker_init`` (main process, before consuming): create the data folders; in the embedded
  deployment, fail the jobs this worker left running when it last stopped (the filesystem
  broker deleted their messages on delivery, so they would never run again).
* ``worker_process_init`` (each pool process, after the fork): choose the compute device.
  This is the first place CUDA may be touched.
* ``worker_ready`` (main process): start the heartbeat the gateway's ``/readyz`` reads.
* ``worker_shutdown`` (main process): stop the heartbeat.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from service.queue import make_celery
from service.settings import get_settings
from service.store import JobError, JobStore
from worker import runtime

log = logging.getLogger(__name__)

celery_app: Celery = make_celery(get_settings(), include=("worker.tasks",))

_heartbeat: runtime.Heartbeat | None = None


@signals.worker_init.connect
def _prepare(sender: Any = None, **_: Any) -> None:
    # Before the consumer starts: the embedded broker's folders must exist, and a job this
    # worker starts must not be mistaken for one its previous run left behind.
    settings = get_settings()
    settings.ensure_dirs()
    name = getattr(sender, "hostname", None)
    if settings.embedded and name:
        _fail_orphans(runtime.services().store, name)


@signals.worker_process_init.connect
def _init_process(**_: Any) -> None:
    runtime.select_device(get_settings().device)


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    svc = runtime.services()
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    task_consumer = getattr(sender, "task_consumer", None)
    queues = sorted(q.name for q in getattr(task_consumer, "queues", []))
    _heartbeat = runtime.Heartbeat(
        svc.store,
        name,
        svc.settings.heartbeat_interval,
        {"pid": os.getpid(), "queues": queues},
    )
    _heartbeat.start()


def _fail_orphans(store: JobStore, name: str) -> None:
    """Fail the jobs a previous run of this worker left running. Only in the embedded
    deployment: the filesystem broker deletes a message when it is delivered, so those jobs
    will never run again. With Redis the unacknowledged message is redelivered instead (and a
    second worker may share this name), so nothing is touched there."""
    orphans = store.fail_running(
        JobError(
            type="WorkerLostError",
            message="the worker stopped while this job was running; submit it again",
        ),
        worker=name,
    )
    if orphans:
        log.warning("failed job(s) left running by a previous %s: %s", name, ", ".join(orphans))


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
