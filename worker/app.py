"""The Celery worker application: ``celery -A worker.app:celery_app worker`` (or
``camres worker``). Configuration comes from :func:`service.queue.make_celery`, shared with the
gateway; the tasks live in :mod:`worker.tasks`.

Process signals:

* ``worker_init`` (main process, before consuming): create the data folders; in the embedded
  deployment, recover the jobs a crash left behind (:mod:`worker.recovery`).
* ``worker_process_init`` (each pool process, after the fork): choose the compute device.
  This is the first place CUDA may be touched.
* ``worker_ready`` (main process): start the heartbeat the gateway's ``/readyz`` reads, and
  the periodic deletion of expired jobs (:mod:`service.retention`).
* ``worker_shutdown`` (main process): stop both.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from service.queue import make_celery
from service.retention import purge_expired
from service.settings import get_settings
from worker import runtime
from worker.recovery import recover_embedded

celery_app: Celery = make_celery(get_settings(), include=("worker.tasks",))

_background: list[runtime.Periodic] = []


@signals.worker_init.connect
def _prepare(sender: Any = None, **_: Any) -> None:
    # Before the consumer starts: the embedded broker's folders must exist, and a job this
    # worker starts must not be mistaken for one its previous run left behind.
    settings = get_settings()
    settings.ensure_dirs()
    name = getattr(sender, "hostname", None)
    if settings.embedded and name:
        recover_embedded(runtime.services().store, settings, name)


@signals.worker_process_init.connect
def _init_process(**_: Any) -> None:
    runtime.select_device(get_settings().device)


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
