"""What a worker process keeps between tasks, and the lifecycle every job goes through.

* The compute device is chosen once per worker *process* (``worker_process_init``), never in
  the parent before the pool forks: CUDA cannot survive a fork, so nothing here touches
  ``torch.cuda`` at import time.
* Models are loaded once per process and kept in a small LRU keyed by model id (a content
  digest), so a stream of CAM jobs on one model pays for loading it once.
* :func:`run_job` moves the job record through its statuses, relays the core's progress
  callbacks into the store (throttled) and answers the core's ``should_stop`` from the job's
  cancel flag; an error becomes a failed job carrying the exception's type and message, and
  the worker goes on serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from billiard.exceptions import SoftTimeLimitExceeded

from core.exceptions import CamresError, CancelledError
from core.progress import Progress
from service.catalog import DatasetCatalog, ModelCatalog, dataset_catalog, model_catalog
from service.settings import Settings, get_settings
from service.store import JobError, JobProgress, JobRecord, JobStore, open_store

if TYPE_CHECKING:
    from torch import nn

    from core.checkpoint import Checkpoint

log = logging.getLogger(__name__)


# --- per-process services ------------------------------------------------------------------------
@dataclass
class WorkerServices:
    """Settings, job store and catalogs of this worker process."""

    settings: Settings
    store: JobStore
    models: ModelCatalog
    datasets: DatasetCatalog


@lru_cache(maxsize=1)
def services() -> WorkerServices:
    """This process's services (the store reconnects by itself after a fork)."""
    settings = get_settings()
    settings.ensure_dirs()
    return WorkerServices(
        settings=settings,
        store=open_store(settings),
        models=model_catalog(settings),
        datasets=dataset_catalog(settings),
    )


# --- device --------------------------------------------------------------------------------------
_device: str | None = None


def select_device(preference: str) -> str:
    """Choose this process's device: ``auto`` → ``cuda`` when present, else ``cpu``."""
    global _device
    import torch  # imported here: selecting a device is the first CUDA call of a process

    if preference == "auto":
        _device = "cuda" if torch.cuda.is_available() else "cpu"
    elif preference.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is unavailable; using cpu", preference)
        _device = "cpu"
    else:
        _device = preference
    log.info("worker process %d computes on %s", os.getpid(), _device)
    return _device


def current_device() -> str:
    """The device chosen for this process (chosen now if the pool did not call the init hook,
    e.g. the threads pool)."""
    return _device if _device is not None else select_device(services().settings.device)


# --- model cache ---------------------------------------------------------------------------------
Loaded = tuple["nn.Module", "Checkpoint"]


class ModelCache:
    """Least-recently-used models of this process, keyed by model id (a content digest, so a
    stale entry is impossible). Cached models are shared: callers must not modify them."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model_id: str, load: Callable[[], Loaded]) -> Loaded:
        with self._lock:
            if model_id in self._entries:
                self._entries.move_to_end(model_id)
                return self._entries[model_id]
            loaded = load()
            self.loads += 1
            self._entries[model_id] = loaded
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return loaded

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@lru_cache(maxsize=1)
def model_cache() -> ModelCache:
    return ModelCache(services().settings.model_cache_size)


# --- job lifecycle -------------------------------------------------------------------------------
@dataclass
class JobContext:
    """What a task body gets: its record and folders, and the core's callbacks."""

    record: JobRecord
    services: WorkerServices
    _last_progress: float = 0.0
    _last_stage: str | None = None
    _last_seen: Progress | None = None
    _written_fraction: float = 0.0
    _last_cancel_check: float = 0.0
    _cancelled: bool = False
    artifacts: Path = field(init=False)
    inputs: Path = field(init=False)

    def __post_init__(self) -> None:
        settings = self.services.settings
        self.artifacts = settings.artifacts_dir / self.record.id
        self.inputs = settings.uploads_dir / self.record.id
        self.artifacts.mkdir(parents=True, exist_ok=True)

    @property
    def job_id(self) -> str:
        return self.record.id

    @property
    def owner(self) -> str | None:
        """Whose job it is: models and datasets are looked up among theirs."""
        return self.record.owner

    @property
    def spec(self) -> dict[str, Any]:
        return self.record.spec

    def progress(self, progress: Progress) -> None:
        """Relay core progress to the store, at most every ``progress_interval`` seconds
        (stage changes and completion are always written)."""
        now = time.monotonic()
        interval = self.services.settings.progress_interval
        self._last_seen = progress
        if (
            progress.stage == self._last_stage
            and progress.fraction < 1.0
            and now - self._last_progress < interval
        ):
            return
        self._last_progress, self._last_stage = now, progress.stage
        self._write(_job_progress(progress))

    def complete_progress(self) -> None:
        """After success, make the job's progress read 1: the last progress the core reported
        (written or throttled away), at fraction 1; nothing to do when 1 was written already."""
        if self._written_fraction < 1.0:
            last = JobProgress() if self._last_seen is None else _job_progress(self._last_seen)
            self._write(last.model_copy(update={"fraction": 1.0}))

    def _write(self, progress: JobProgress) -> None:
        self.services.store.set_progress(self.job_id, progress)
        self._written_fraction = progress.fraction

    def should_stop(self) -> bool:
        """True once the job was cancelled (the store is asked at most every
        ``cancel_poll_interval`` seconds)."""
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.services.settings.cancel_poll_interval:
            self._last_cancel_check = now
            self._cancelled = self.services.store.cancel_requested(self.job_id)
        return self._cancelled


def _job_progress(progress: Progress) -> JobProgress:
    return JobProgress(
        fraction=min(max(progress.fraction, 0.0), 1.0),
        stage=progress.stage,
        message=progress.message,
        metrics=_jsonable(progress.metrics),
    )


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Keep JSON scalars only (metrics may carry tensors or numpy numbers)."""
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float | str) or value is None:
            clean[str(key)] = value
        elif hasattr(value, "item"):
            clean[str(key)] = value.item()
    return clean


def error_of(exc: BaseException) -> JobError:
    """How a failed job reports ``exc``: class name, message, and the field at fault."""
    if isinstance(exc, CamresError):
        return JobError(type=type(exc).__name__, message=exc.message, field=exc.field)
    return JobError(type=type(exc).__name__, message=str(exc) or type(exc).__name__)


JobBody = Callable[[JobContext], dict[str, Any]]


def lost_worker_error(attempts: int, limit: int) -> JobError:
    """How a job whose worker kept dying under it fails."""
    return JobError(
        type="WorkerLostError",
        message=f"the worker running this job died {attempts} times (limit {limit} attempts); "
        "the job may exhaust the worker's memory or crash it",
    )


def run_job(job_id: str, worker: str, body: JobBody) -> dict[str, Any]:
    """Run ``body`` as job ``job_id``; return a small summary for Celery's logs.

    The job is skipped when it was cancelled (or already finished) before it started, and
    failed without running when its previous ``max_attempts`` runs all lost their worker (a
    task is redelivered when its worker process dies; a job that kills its worker every time
    must not loop forever).
    """
    svc = services()
    record = svc.store.start(job_id, worker)
    if record is None:
        existing = svc.store.get(job_id)
        if existing is not None and not existing.finished and existing.cancel_requested:
            svc.store.finish(job_id, "cancelled")
        log.info("job %s not started (%s)", job_id, existing.status if existing else "unknown")
        return {"job": job_id, "status": "skipped"}
    limit = svc.settings.max_attempts
    if record.attempts > limit:
        svc.store.finish(job_id, "failed", error=lost_worker_error(record.attempts - 1, limit))
        shutil.rmtree(svc.settings.uploads_dir / job_id, ignore_errors=True)
        log.error("job %s failed: its worker died in all %d attempts", job_id, limit)
        return {"job": job_id, "status": "failed"}
    ctx = JobContext(record=record, services=svc)
    status, error, result = "succeeded", None, None
    try:
        result = body(ctx)
    except CancelledError:
        status = "cancelled"
    except SoftTimeLimitExceeded:
        status = "failed"
        error = JobError(
            type="TimeLimitExceeded",
            message=f"the job ran longer than {svc.settings.task_soft_time_limit} s",
        )
    except Exception as exc:  # a job's failure must never take the worker down
        status, error = "failed", error_of(exc)
        if not isinstance(exc, CamresError):
            log.exception("job %s failed", job_id)
    finally:
        shutil.rmtree(ctx.inputs, ignore_errors=True)
    if status == "succeeded":
        ctx.complete_progress()
    svc.store.finish(job_id, status, result=result, error=error)  # type: ignore[arg-type]
    return {"job": job_id, "status": status}


# --- background threads of the worker's main process -------------------------------------------
class Periodic:
    """A daemon thread calling ``action`` now and then every ``interval`` seconds until
    stopped; an exception is logged and the next call happens on time (the store may be down
    for a while)."""

    def __init__(self, name: str, interval: float, action: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._call()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._call()

    def _call(self) -> None:
        try:
            self.action()
        except Exception:
            log.warning("%s failed", self.name, exc_info=True)


class Heartbeat(Periodic):
    """Writes ``worker``'s heartbeat to the store every ``interval`` seconds."""

    def __init__(self, store: JobStore, worker: str, interval: float, info: dict[str, Any]):
        super().__init__(
            f"camres-heartbeat-{worker}", interval, lambda: store.heartbeat(worker, info)
        )


@contextmanager
def heartbeat(store: JobStore, worker: str, interval: float, **info: Any) -> Iterator[Heartbeat]:
    """Run a :class:`Heartbeat` for the duration of the block."""
    beat = Heartbeat(store, worker, interval, info)
    beat.start()
    try:
        yield beat
    finally:
        beat.stop()
