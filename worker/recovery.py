"""What a worker of the embedded deployment does before it consumes: recover the jobs a crash
left behind, so that none is lost and none stays ``running`` forever.

The embedded broker (kombu's filesystem transport) deletes a message when it is delivered. A
pool process that dies is noticed by its worker, which puts the task back
(``task_reject_on_worker_lost``); but when the whole worker dies, the messages it had taken are
gone. So at startup, a worker

* sends again the jobs it left ``running`` (its name is stable: ``embedded@<host>``), counting
  the attempt — a job whose worker died ``max_attempts`` times is failed with that reason;
* sends again the ``queued`` jobs whose message is missing from the broker folder (taken by a
  worker that died before starting them, or never sent by a gateway that died), once they are
  older than the heartbeat limit, so that a gateway's submission in flight is left alone.

With Redis none of this is needed: an unacknowledged message is redelivered by the broker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from celery import Celery

from service.queue import make_celery, send_job
from service.settings import Settings
from service.store import JobError, JobRecord, JobStore
from worker.runtime import lost_worker_error

log = logging.getLogger(__name__)


def recover_embedded(store: JobStore, settings: Settings, worker: str) -> None:
    """Requeue or fail ``worker``'s orphaned running jobs and resend lost queued ones."""
    producer = make_celery(settings)  # torch-free, like the gateway's: it only sends
    try:
        requeued, failed = recover_orphans(store, settings, producer, worker)
        resent = resend_lost(store, settings, producer)
    finally:
        producer.close()
    if requeued or failed or resent:
        log.warning(
            "recovered jobs after a crash of %s: requeued %s, failed %s, resent %s",
            worker,
            requeued or "none",
            failed or "none",
            resent or "none",
        )


def recover_orphans(
    store: JobStore, settings: Settings, celery: Celery, worker: str
) -> tuple[list[str], list[str]]:
    """Jobs ``worker`` left running: send each again, or fail it after ``max_attempts``."""
    requeued: list[str] = []
    failed: list[str] = []
    for record in _jobs(store, "running"):
        if record.worker != worker:
            continue
        if record.attempts >= settings.max_attempts:
            if store.finish(
                record.id, "failed", error=lost_worker_error(record.attempts, settings.max_attempts)
            ):
                failed.append(record.id)
        elif store.requeue(record.id) and _send(store, settings, celery, record):
            requeued.append(record.id)
    return requeued, failed


def resend_lost(store: JobStore, settings: Settings, celery: Celery) -> list[str]:
    """Queued jobs older than the heartbeat limit that have no message in the broker folder."""
    waiting = _queued_message_ids(settings.broker_dir / "queue")
    cutoff = time.time() - settings.heartbeat_max_age
    return [
        record.id
        for record in _jobs(store, "queued")
        if record.created_at < cutoff
        and record.id not in waiting
        and _send(store, settings, celery, record)
    ]


def _send(store: JobStore, settings: Settings, celery: Celery, record: JobRecord) -> bool:
    try:
        send_job(celery, settings, record.id, record.kind)
    except Exception as exc:  # the broker folder is gone or full: fail, never lose silently
        store.finish(record.id, "failed", error=JobError(type="BrokerError", message=str(exc)))
        return False
    return True


def _jobs(store: JobStore, status: str) -> Iterator[JobRecord]:
    page = store.list_jobs(status=status, limit=500)
    while True:
        yield from page.items
        if page.next_cursor is None:
            return
        page = store.list_jobs(status=status, limit=500, cursor=page.next_cursor)


def _queued_message_ids(folder: Path) -> set[str]:
    """Task ids of the messages waiting in the filesystem broker's folder."""
    ids: set[str] = set()
    for path in folder.glob("*.msg"):
        try:
            ids.add(str(json.loads(path.read_bytes())["headers"]["id"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # taken meanwhile, or being written: not ours to judge
    return ids
