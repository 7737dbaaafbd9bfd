"""Jobs: submit, list, read, cancel, and download artifacts."""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BeforeValidator, Json

from service.auth import Principal
from service.deps import (
    CeleryDep,
    DatasetsDep,
    MetricsDep,
    ModelsDep,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    WatcherDep,
    require_form,
)
from service.problems import ApiError, field_error, not_found, problem_responses
from service.queue import send_job
from service.schemas import Artifact, ArtifactList, Job, JobList, JobSpec
from service.settings import JobKind
from service.store import (
    ANY_OWNER,
    InvalidCursorError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobRecord,
    JobStatus,
    TooManyJobsError,
)
from service.submission import (
    cam_batchable,
    check_references,
    spec_document,
    store_images,
    strict_json,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(401))

#: Longest ``wait`` of a long poll, in seconds: under the idle timeouts of common proxies.
MAX_WAIT_S = 30.0

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_MEDIA_TYPES = {
    ".png": "image/png",
    ".json": "application/json",
    ".npy": "application/octet-stream",
    ".safetensors": "application/octet-stream",
    ".csv": "text/csv",
    ".jsonl": "application/x-ndjson",
    ".txt": "text/plain",
}

SPEC_HELP = (
    'The job specification as a JSON document (schema JobSpec), discriminated by "kind": '
    "cam, damage, retrain, train, evaluate, transfer or sweep."
)


def _get_record(store: StoreDep, job_id: str, principal: Principal) -> JobRecord:
    """The job, if the caller may see it: someone else's job is as unknown as a missing one."""
    record = store.get(job_id)
    if record is None or not principal.can_see(record.owner):
        raise not_found("job", job_id)
    return record


@router.post(
    "",
    status_code=202,
    response_model=Job,
    dependencies=[Depends(require_form)],
    responses=problem_responses(400, 413, 415, 422, 429, 503),
)
def create_job(
    spec: Annotated[Json[JobSpec], BeforeValidator(strict_json), Form(description=SPEC_HELP)],
    settings: SettingsDep,
    store: StoreDep,
    models: ModelsDep,
    datasets: DatasetsDep,
    celery: CeleryDep,
    metrics: MetricsDep,
    principal: PrincipalDep,
    response: Response,
    images: Annotated[
        list[UploadFile] | None, File(description="Images to explain (cam jobs).")
    ] = None,
) -> Job:
    """Queue a job; poll the returned Location until its status is final. 429 (with
    Retry-After) while the caller already has the maximum of queued and running jobs."""
    job_spec = spec.root
    uploads = images or []
    check_references(job_spec, settings, models, datasets, len(uploads), principal.owner)
    job_id = uuid.uuid4().hex
    inputs = settings.uploads_dir / job_id
    record = JobRecord(
        id=job_id, kind=job_spec.kind, spec=spec_document(job_spec), owner=principal.owner
    )
    try:
        if uploads:
            store_images(uploads, inputs, settings.max_image_pixels)
        store.create(record, max_active=settings.max_active_jobs)
    except TooManyJobsError as exc:
        shutil.rmtree(inputs, ignore_errors=True)
        raise ApiError(
            429,
            f"{exc}; retry when one of them has finished",
            problem="too-many-jobs",
            headers={"Retry-After": str(settings.busy_retry_after)},
        ) from exc
    except BaseException:
        shutil.rmtree(inputs, ignore_errors=True)
        raise
    try:
        batchable = cam_batchable(job_spec, len(uploads))
        send_job(celery, settings, job_id, job_spec.kind, batchable=batchable)
    except Exception as exc:  # any broker failure: the job must not stay queued forever
        log.exception("cannot queue job %s", job_id)
        store.finish(job_id, "failed", error=JobError(type="BrokerError", message=str(exc)))
        raise ApiError(
            503, f"the job could not be queued: {exc}", problem="broker-unavailable"
        ) from exc
    metrics.jobs_submitted.labels(job_spec.kind).inc()
    response.headers["Location"] = f"{router.prefix}/{job_id}"
    return Job.from_record(record)


@router.get("", response_model=JobList, responses=problem_responses(422))
def list_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(min_length=1, max_length=512)] = None,
) -> JobList:
    """The caller's jobs (an admin's: everyone's), newest first; pass ``next_cursor`` back as
    ``cursor`` for the next page."""
    owner = ANY_OWNER if principal.admin else principal.owner
    try:
        page = store.list_jobs(status=status, kind=kind, limit=limit, cursor=cursor, owner=owner)
    except InvalidCursorError as exc:
        raise field_error("cursor", "is not a cursor this server handed out") from exc
    return JobList(
        items=[Job.from_record(record) for record in page.items], next_cursor=page.next_cursor
    )


@router.get("/{job_id}", response_model=Job, responses=problem_responses(404, 422))
async def read_job(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    watcher: WatcherDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="Long polling: hold the reply up to this many seconds until the job "
            "has ended (succeeded, failed or cancelled), then answer as without it. 0 answers "
            "at once. Cheaper for both sides than polling often.",
        ),
    ] = 0.0,
) -> Job:
    """One job: status, progress, result or error (with ``wait``, once it has ended)."""
    record = await run_in_threadpool(_get_record, store, job_id, principal)
    if wait > 0 and not record.finished:
        await watcher.wait_finished(job_id, wait)
        record = await run_in_threadpool(_get_record, store, job_id, principal)
    return Job.from_record(record)


@router.post(
    "/{job_id}/cancel", status_code=202, response_model=Job, responses=problem_responses(404, 409)
)
def cancel_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> Job:
    """Cancel a job: a queued job is cancelled at once, a running one stops at its next check."""
    _get_record(store, job_id, principal)
    try:
        record = store.request_cancel(job_id)
    except JobNotFoundError as exc:
        raise not_found("job", job_id) from exc
    except JobConflictError as exc:
        raise ApiError(409, str(exc), problem="job-finished") from exc
    return Job.from_record(record)


def _artifact_dir(settings: SettingsDep, job_id: str) -> Path:
    return settings.artifacts_dir / job_id


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=problem_responses(404))
def list_artifacts(
    job_id: str, store: StoreDep, settings: SettingsDep, principal: PrincipalDep
) -> ArtifactList:
    """Files the job wrote so far (overlays, raw maps, JSON results, checkpoints); a running
    sweep's ``sweep_cells.jsonl`` (``sweep_cells.<part>.jsonl`` per part when it is split
    across workers) holds the rows of the cells finished so far."""
    _get_record(store, job_id, principal)
    folder = _artifact_dir(settings, job_id)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return ArtifactList(
        items=[
            Artifact(
                name=path.name,
                size=path.stat().st_size,
                media_type=_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                url=f"{router.prefix}/{job_id}/artifacts/{path.name}",
            )
            for path in files
            if _ARTIFACT_NAME.match(path.name)
        ]
    )


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}, "application/json": {}, "application/octet-stream": {}}},
        **problem_responses(400, 404),
    },
)
def read_artifact(
    job_id: str, name: str, store: StoreDep, settings: SettingsDep, principal: PrincipalDep
) -> FileResponse:
    """Download one artifact by name (names never contain '/')."""
    _get_record(store, job_id, principal)
    if not _ARTIFACT_NAME.match(name) or ".." in name:
        raise field_error(
            "name",
            "is not an artifact name (letters, digits, '.', '_' and '-'; no '/' or '..')",
            status=400,
        )
    path = _artifact_dir(settings, job_id) / name
    if not path.is_file():
        raise ApiError(404, f"job {job_id!r} has no artifact {name!r}", problem="not-found")
    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media_type, filename=name)
