"""The service's job store: one interface (:class:`JobStore`), a SQLite backend for the
embedded deployment and a Redis backend for scale-out, chosen from the settings."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import (
    ACTIVE,
    ANY_OWNER,
    JOB_STATUSES,
    TERMINAL,
    FinishStatus,
    InvalidCursorError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobPage,
    JobProgress,
    JobRecord,
    JobStatus,
    JobStore,
    OwnerFilter,
    PartState,
    StoreError,
    TooManyJobsError,
    WorkerBeat,
    utc,
)

__all__ = [
    "ACTIVE",
    "ANY_OWNER",
    "JOB_STATUSES",
    "TERMINAL",
    "FinishStatus",
    "InvalidCursorError",
    "JobConflictError",
    "JobError",
    "JobNotFoundError",
    "JobPage",
    "JobProgress",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "OwnerFilter",
    "PartState",
    "StoreError",
    "TooManyJobsError",
    "WorkerBeat",
    "open_store",
    "utc",
]


def open_store(settings: Settings) -> JobStore:
    """The job store the settings point at (``sqlite:///…`` or ``redis://…``)."""
    url = settings.effective_store_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis import RedisJobStore

        return RedisJobStore.from_url(url, prefix=settings.redis_prefix)
    if url.startswith("sqlite:///"):
        from service.store.sqlite import SQLiteJobStore

        return SQLiteJobStore.from_url(url)
    raise StoreError(f"unsupported job store URL {url!r} (use sqlite:/// or redis://)")
