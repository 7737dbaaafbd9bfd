"""Expiry of finished jobs: after ``result_ttl`` seconds a finished job's record, artifacts and
leftover inputs are deleted. Workers run :func:`purge_expired` periodically; it is idempotent,
so several workers sweeping the same store at once is harmless. Torch-free, FastAPI-free.
"""

from __future__ import annotations

import logging
import re
import shutil
import time

from service.settings import Settings
from service.store import JobStore

log = logging.getLogger(__name__)

#: Job ids name folders: anything else is never turned into a path.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_BATCH = 200


def purge_expired(store: JobStore, settings: Settings, now: float | None = None) -> list[str]:
    """Delete the jobs that finished more than ``settings.result_ttl`` seconds before ``now``
    (nothing when it is 0) and return their ids. Files go first, then the record: a sweep
    interrupted in between leaves a record that the next sweep deletes again."""
    if settings.result_ttl == 0:
        return []
    before = (time.time() if now is None else now) - settings.result_ttl
    purged: list[str] = []
    while True:
        batch = store.expired(before, limit=_BATCH)
        for job_id in batch:
            if _SAFE_ID.match(job_id):
                shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)
                shutil.rmtree(settings.uploads_dir / job_id, ignore_errors=True)
            if store.delete(job_id):
                purged.append(job_id)
        if len(batch) < _BATCH:
            break
    if purged:
        log.info("deleted %d expired job(s)", len(purged))
    return purged
