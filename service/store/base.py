"""The job store's contract: job records, their status machine, worker heartbeats.

The gateway creates a record before it sends the task (so a job is visible at once), the
worker moves it through ``queued → running → succeeded | failed | cancelled``. Every transition
is a single atomic compare-and-set in the backend, so a cancel racing a finish, or a task
redelivered after a worker died, cannot corrupt a record. Torch-free, FastAPI-free.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
FinishStatus = Literal["succeeded", "failed", "cancelled"]


class _AnyOwner(enum.Enum):
    ANY = "any"


#: ``owner=`` filter matching every owner (None matches the unowned jobs only).
ANY_OWNER: Final = _AnyOwner.ANY
OwnerFilter = str | None | Literal[_AnyOwner.ANY]


class StoreError(Exception):
    """The job store cannot be reached or used."""


class JobNotFoundError(StoreError, LookupError):
    """No job has that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobConflictError(StoreError):
    """The job is in a status that does not allow the operation (e.g. cancelling a finished
    job)."""

    def __init__(self, job_id: str, status: str, operation: str) -> None:
        super().__init__(f"job {job_id!r} is {status}; cannot {operation} it")
        self.job_id = job_id
        self.status = status


class InvalidCursorError(StoreError, ValueError):
    """A list cursor that this store did not hand out."""


class TooManyJobsError(Exception):
    """The owner already has the maximum number of queued and running jobs (not a store
    failure: the store works, the request is refused)."""

    def __init__(self, owner: str | None, limit: int) -> None:
        who = f"owner {owner!r}" if owner is not None else "this server"
        super().__init__(f"{who} already has {limit} queued or running jobs, the limit")
        self.owner = owner
        self.limit = limit


class JobProgress(BaseModel):
    """The last progress a worker reported: overall fraction, stage and message."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    stage: str = ""
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    """Why a job failed: the exception's class name and its message (and the field at fault,
    when the error names one)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    message: str
    field: str | None = None


class JobRecord(BaseModel):
    """One job as stored. Times are epoch seconds (UTC) so backends can order them exactly."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    status: JobStatus = "queued"
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    spec: dict[str, Any]
    progress: JobProgress = Field(default_factory=JobProgress)
    result: dict[str, Any] | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    worker: str | None = None
    owner: str | None = None
    attempts: int = Field(default=0, ge=0, description="Times a worker started the job.")

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class PartState(BaseModel):
    """One part of a job split across workers (a sweep fanned out, see
    ``worker.sweep_fanout``): what it computes (``spec``), its share of the job's work
    (``weight``), its last progress, and its runs."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(default=1.0, gt=0.0)
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    done: bool = False
    attempts: int = Field(default=0, ge=0, description="Times a worker started the part.")
    worker: str | None = None


#: A change of a job's parts: current parts → (parts to write, new job progress or None).
PartsChange = Callable[[dict[str, PartState]], tuple[dict[str, PartState], JobProgress | None]]


def combined_progress(parts: dict[str, PartState], latest: JobProgress) -> JobProgress:
    """The job's progress from its parts': the fraction is the parts' fractions weighted by
    their share of the work; stage, message and metrics are the reporting part's (``latest``),
    with ``parts`` and ``parts_done`` added."""
    total = sum(p.weight for p in parts.values())
    fraction = sum(p.weight * p.fraction for p in parts.values()) / total if total else 0.0
    metrics = {
        **latest.metrics,
        "parts": len(parts),
        "parts_done": sum(p.done for p in parts.values()),
    }
    return latest.model_copy(update={"fraction": min(max(fraction, 0.0), 1.0), "metrics": metrics})


class WorkerBeat(BaseModel):
    """A worker's last sign of life."""

    name: str
    seen_at: float
    info: dict[str, Any] = Field(default_factory=dict)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.seen_at


class JobPage(BaseModel):
    """One page of a job listing, newest first."""

    items: list[JobRecord]
    next_cursor: str | None = None


def utc(timestamp: float | None) -> datetime | None:
    """Epoch seconds → aware UTC datetime (None stays None)."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


def encode_cursor(created_at: float, job_id: str) -> str:
    """An opaque cursor pointing just after ``(created_at, job_id)`` in newest-first order."""
    raw = json.dumps([created_at, job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Inverse of :func:`encode_cursor`; :class:`InvalidCursorError` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        if not isinstance(job_id, str) or not isinstance(created_at, int | float):
            raise ValueError("bad cursor shape")
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidCursorError("invalid cursor") from exc
    return float(created_at), job_id


class JobStore(ABC):
    """Job records, cancel flags and worker heartbeats, shared by the gateway and workers.

    Implementations must be safe to use from several threads of one process and from several
    processes (each opens its own connections; a store object survives ``fork``).
    """

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreError` when the backend does not answer."""

    @abstractmethod
    def create(self, record: JobRecord, *, max_active: int | None = None) -> None:
        """Insert a new record; :class:`JobConflictError` when the id exists,
        :class:`TooManyJobsError` when the record's owner already has ``max_active`` queued or
        running jobs (checked and inserted atomically)."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The record, or None."""

    def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The status of each job of ``job_ids`` that exists (missing ones are left out).
        Long polling asks this many times a second for every awaited job, so backends answer
        it in one round trip; this fallback reads the records one by one."""
        return {job_id: r.status for job_id in job_ids if (r := self.get(job_id)) is not None}

    @abstractmethod
    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: OwnerFilter = ANY_OWNER,
    ) -> JobPage:
        """Records newest first, optionally filtered; ``next_cursor`` continues the listing."""

    @abstractmethod
    def start(self, job_id: str, worker: str) -> JobRecord | None:
        """Mark the job running on ``worker``, count the attempt, and return it; None when it
        must not run (cancelled, finished, unknown). A running job may be started again: that
        is a task redelivered after its worker died."""

    @abstractmethod
    def requeue(self, job_id: str) -> bool:
        """Move a running job back to queued (its worker is gone and its task is sent again);
        False when it is not running."""

    @abstractmethod
    def set_progress(self, job_id: str, progress: JobProgress) -> None:
        """Record progress of a running job (ignored once it finished)."""

    @abstractmethod
    def finish(
        self,
        job_id: str,
        status: FinishStatus,
        *,
        result: dict[str, Any] | None = None,
        error: JobError | None = None,
    ) -> bool:
        """Move an unfinished job to a final status; False when it had already finished."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once, or flag a running one for its worker; return the
        record. :class:`JobNotFoundError` / :class:`JobConflictError` (already finished)."""

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool:
        """True when the job was cancelled or asked to stop."""

    @abstractmethod
    def fail_running(self, error: JobError, *, worker: str | None = None) -> list[str]:
        """Fail every running job (of ``worker`` when given) and return their ids: jobs whose
        worker is known to be gone (the embedded worker restarted)."""

    @abstractmethod
    def expired(self, before: float, limit: int = 500) -> list[str]:
        """Ids of finished jobs that finished before ``before`` (epoch seconds), oldest first."""

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Remove a finished job's record; False when unknown or not finished. The job still
        counts in :meth:`counts` (finished-job counts never go down: they feed counters)."""

    @abstractmethod
    def heartbeat(self, worker: str, info: dict[str, Any] | None = None) -> None:
        """Record that ``worker`` is alive now."""

    @abstractmethod
    def workers(self) -> list[WorkerBeat]:
        """Known workers and when they were last seen, most recent first."""

    @abstractmethod
    def counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs per ``(kind, status)``, including deleted finished jobs."""

    # --- parts of a job run by several workers ----------------------------------------------
    @abstractmethod
    def parts(self, job_id: str) -> dict[str, PartState]:
        """The job's parts by name (empty when it was never split)."""

    @abstractmethod
    def update_parts(self, job_id: str, change: PartsChange) -> dict[str, PartState] | None:
        """Atomically, if the job is running: read its parts, apply ``change``, write the parts
        it returns (and the job's progress when it returns one); return every part after the
        change. None, changing nothing, when the job is not running."""

    def declare_parts(
        self, job_id: str, parts: dict[str, PartState]
    ) -> dict[str, PartState] | None:
        """Split a running job into ``parts``, once: a job already split keeps its parts (a
        redelivered dispatcher must find the plan it sent). Returns the parts stored."""

        def change(
            current: dict[str, PartState],
        ) -> tuple[dict[str, PartState], JobProgress | None]:
            if current:
                return {}, None
            return parts, combined_progress(parts, JobProgress(stage="parts"))

        return self.update_parts(job_id, change)

    def start_part(self, job_id: str, part: str, worker: str) -> PartState | None:
        """Count a run of ``part`` on ``worker`` and return it; None when the job is not
        running (finished, cancelled) or has no such part."""

        def change(
            current: dict[str, PartState],
        ) -> tuple[dict[str, PartState], JobProgress | None]:
            if part not in current:
                return {}, None
            state = current[part]
            return {
                part: state.model_copy(update={"attempts": state.attempts + 1, "worker": worker})
            }, None

        states = self.update_parts(job_id, change)
        return None if states is None else states.get(part)

    def set_part_progress(self, job_id: str, part: str, progress: JobProgress) -> None:
        """Record one part's progress; the job's becomes the parts' combined
        (:func:`combined_progress`), so parts never overwrite each other's."""

        def change(
            current: dict[str, PartState],
        ) -> tuple[dict[str, PartState], JobProgress | None]:
            if part not in current:
                return {}, None
            update = {"fraction": progress.fraction, "metrics": progress.metrics}
            states = {**current, part: current[part].model_copy(update=update)}
            return {part: states[part]}, combined_progress(states, progress)

        self.update_parts(job_id, change)

    def finish_part(self, job_id: str, part: str) -> dict[str, PartState] | None:
        """Mark ``part`` done (idempotent) and return every part: the caller that sees them all
        done merges. None when the job is not running."""

        def change(
            current: dict[str, PartState],
        ) -> tuple[dict[str, PartState], JobProgress | None]:
            if part not in current:
                return {}, None
            state = current[part].model_copy(update={"done": True, "fraction": 1.0})
            states = {**current, part: state}
            latest = JobProgress(stage="parts", message=f"part {part} done", metrics={"part": part})
            return {part: state}, combined_progress(states, latest)

        return self.update_parts(job_id, change)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
