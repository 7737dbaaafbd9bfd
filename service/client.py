"""A small synchronous client of the camres REST API, for ground-station pipelines.

Torch-free and FastAPI-free: it needs only ``httpx``. It speaks the routes of ``/v1`` (models,
datasets, jobs, artifacts) and turns every error response — ``application/problem+json``
(RFC 9457) — into one exception class, :class:`ApiError`, that keeps the problem's fields::

    with CamresClient("http://127.0.0.1:8000") as api:
        model = api.upload_model("ucm-resnet50.safetensors")
        job = api.submit_job(
            {"kind": "cam", "model": model["id"], "cam": {"top_k": 1}},
            images=["tile_0001.jpg"],
        )
        job = api.wait(job["id"], timeout=600)
        files = api.download_artifacts(job["id"], "out/")

Errors, as one tree::

    ClientError
    ├── ApiError               an HTTP error response (status, title, detail, errors, ...)
    ├── ServiceUnreachableError connection failures that outlived the retries
    └── JobError               a job that ended without succeeding (carries the job record)
        ├── JobFailedError
        ├── JobCancelledError
        └── JobTimeoutError    wait() ran out of time (also a TimeoutError)

Idempotent reads (GET) are retried on connection errors and 503 responses, with exponential
backoff. A POST is never repeated after a connection error (it may have created a job), with one
exception: a job submission answered ``429 Too Many Requests`` — the caller already has the
maximum of queued and running jobs, and the job was *not* created — is sent again after the
server's ``Retry-After``, a bounded number of times.
"""

from __future__ import annotations

import json
import mimetypes
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Final
from urllib.parse import quote

import httpx

__all__ = [
    "ApiError",
    "CamresClient",
    "ClientError",
    "FieldError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobTimeoutError",
    "ServiceUnreachableError",
]

Job = dict[str, Any]
JobCallback = Callable[[Job], None]
PathLike = str | os.PathLike[str]

#: Job states after which a job never changes again.
TERMINAL_STATES: Final = frozenset({"succeeded", "failed", "cancelled"})

DEFAULT_TIMEOUT: Final = httpx.Timeout(60.0, connect=5.0)
#: Seconds one long-polling request of :meth:`CamresClient.wait` asks the service to hold.
LONG_POLL_S: Final = 20.0
#: Seconds a long poll leaves between its hold and the read timeout (answer, network).
_READ_MARGIN_S: Final = 2.0
#: The gateway's header for API keys (it also accepts ``Authorization: Bearer <key>``).
API_KEY_HEADER: Final = "X-API-Key"
_RETRY_STATUSES: Final = frozenset({503})
_BUSY: Final = 429
_MAX_RETRY_AFTER: Final = 30.0
_CHUNK: Final = 1 << 16
_PROBLEM_MEMBERS: Final = frozenset({"type", "title", "status", "detail", "instance", "errors"})


class ClientError(Exception):
    """Base class of every error this client raises."""


@dataclass(frozen=True)
class FieldError:
    """One entry of a problem's ``errors``: the request field at fault and what is wrong."""

    field: str | None
    message: str


class ApiError(ClientError):
    """The service answered with an error status; the RFC 9457 problem fields are kept.

    ``errors`` lists per-field problems (validation errors name fields such as
    ``spec.damage.fraction``); other members of the problem are kept in ``extensions``
    (e.g. the ``checks`` of a failed readiness probe). A body that is not problem+json (a
    proxy's HTML page) still gives ``status`` and ``title`` from the HTTP status line, with the
    text as ``detail``.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type: str = "about:blank",
        instance: str | None = None,
        errors: Sequence[FieldError] = (),
        extensions: Mapping[str, Any] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.errors = list(errors)
        self.extensions = dict(extensions or {})
        self.method = method
        self.url = url
        super().__init__(self._summary())

    def _summary(self) -> str:
        lines = [f"{error.field or '(request)'}: {error.message}" for error in self.errors]
        text = f"{self.status} {self.title}"
        # Gateways often build the detail from the field errors; say it once.
        if self.detail and self.detail != self.title and self.detail != "; ".join(lines):
            text += f": {self.detail}"
        return "\n  ".join([text, *lines])

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Build the error from a response, whatever its body (problem+json or not)."""
        problem: Mapping[str, Any] = {}
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, Mapping):
            problem = body
        detail = problem.get("detail")
        if detail is None and not problem:
            detail = response.text.strip()[:500] or None
        return cls(
            status=int(problem.get("status") or response.status_code),
            title=str(problem.get("title") or response.reason_phrase or "HTTP error"),
            detail=None if detail is None else str(detail),
            type=str(problem.get("type") or "about:blank"),
            instance=problem.get("instance"),
            errors=_field_errors(problem.get("errors")),
            extensions={k: v for k, v in problem.items() if k not in _PROBLEM_MEMBERS},
            method=response.request.method,
            url=str(response.request.url),
        )


def _field_errors(raw: object) -> list[FieldError]:
    if not isinstance(raw, list):
        return []
    return [
        FieldError(field=item.get("field"), message=str(item.get("message", "")))
        for item in raw
        if isinstance(item, Mapping)
    ]


class ServiceUnreachableError(ClientError):
    """The service could not be reached (refused, reset, timed out), even after retries."""


class JobError(ClientError):
    """A job ended without succeeding; ``job`` is its last known record."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job

    @property
    def job_id(self) -> str:
        return str(self.job.get("id", "?"))

    @property
    def attempts(self) -> int:
        """Runs a worker started (0 while it never started; more than 1 after a lost worker)."""
        return int(self.job.get("attempts") or 0)


class JobFailedError(JobError):
    """The job failed; ``error_type`` and ``error_message`` come from its ``error`` field."""

    def __init__(self, job: Job) -> None:
        error = job.get("error") or {}
        self.error_type = str(error.get("type") or "Error")
        self.error_message = str(error.get("message") or "no message")
        super().__init__(
            f"job {job.get('id', '?')} failed: {self.error_type}: {self.error_message}", job
        )


class JobCancelledError(JobError):
    """The job was cancelled before it finished."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.get('id', '?')} was cancelled", job)


class JobTimeoutError(JobError, TimeoutError):
    """:meth:`CamresClient.wait` gave up; the job itself may still finish later."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"job {job.get('id', '?')} still {job.get('status', '?')} after {timeout:g} s", job
        )


class CamresClient:
    """A client of one camres service.

    ``api_key``, when given, is sent in the ``X-API-Key`` header. ``retries`` bounds the extra
    attempts of a GET after a connection error or a 503, waiting ``backoff``·2ⁿ seconds (or the
    server's ``Retry-After``, capped at 30 s) between them. ``busy_retries`` bounds the extra
    attempts of a job submission refused with a 429, each after the server's ``Retry-After``
    (same cap; ``backoff``·2ⁿ without the header).

    ``http_client`` lets a caller supply a configured :class:`httpx.Client` (a proxy, mTLS,
    event hooks); requests then go to *its* ``base_url``, and the caller owns and closes it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 3,
        busy_retries: int = 3,
        backoff: float = 0.25,
        http_client: httpx.Client | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if busy_retries < 0:
            raise ValueError("busy_retries must be >= 0")
        if backoff < 0:
            raise ValueError("backoff must be >= 0")
        self.retries = retries
        self.busy_retries = busy_retries
        self.backoff = backoff
        self._sleep: Callable[[float], None] = time.sleep
        # Sent with each request rather than set on the client: a caller's client stays as is.
        self._headers = {"Accept": "application/json, application/problem+json"}
        if api_key:
            self._headers[API_KEY_HEADER] = api_key
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._http = http_client

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (not a caller-supplied ``http_client``)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> CamresClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- service -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the gateway process is up."""
        return self._get_json("/healthz")

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: the broker answers and a worker is alive; an :class:`ApiError`
        (503) when not."""
        return self._get_json("/readyz")

    # -- models --------------------------------------------------------------------------

    def upload_model(self, path: PathLike) -> dict[str, Any]:
        """Upload a ``.safetensors`` checkpoint; returns its ModelInfo (``id`` = its digest)."""
        source = _existing_file(path, "path")
        with source.open("rb") as handle:
            files = {"file": (source.name, handle, "application/octet-stream")}
            return self._send("POST", "/v1/models", files=files)

    def list_models(self) -> list[dict[str, Any]]:
        """Every model the service knows, built-ins included."""
        return list(self._get_json("/v1/models")["items"])

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._get_json(f"/v1/models/{_segment(model_id)}")

    # -- datasets ------------------------------------------------------------------------

    def upload_dataset(self, path: PathLike, *, name: str | None = None) -> dict[str, Any]:
        """Upload a dataset: a zip of class folders, or a folder of class folders (zipped on
        the fly into a temporary file). Returns its DatasetInfo."""
        source = Path(path)
        data = {"name": name} if name else None
        with _dataset_archive(source) as (filename, handle):
            files = {"file": (filename, handle, "application/zip")}
            return self._send("POST", "/v1/datasets", files=files, data=data)

    def list_datasets(self) -> list[dict[str, Any]]:
        return list(self._get_json("/v1/datasets")["items"])

    # -- jobs ----------------------------------------------------------------------------

    def submit_job(self, spec: Mapping[str, Any], images: Sequence[PathLike] = ()) -> Job:
        """Submit a job: ``spec`` is a JobSpec (``{"kind": "cam", ...}``), ``images`` the files
        a cam job explains. Returns the queued job record.

        While the service answers 429 (this caller has too many unfinished jobs; nothing was
        created), the submission is repeated after its ``Retry-After``, at most
        ``busy_retries`` times; then the 429 is raised as an :class:`ApiError`.
        """
        paths = [_existing_file(image, "images") for image in images]
        document = json.dumps(dict(spec))
        for attempt in range(self.busy_retries + 1):
            # The files are opened anew for each attempt: a sent body has been read to its end.
            with ExitStack() as stack:
                # The spec travels as a filename-less part, i.e. a plain form field: the request
                # is multipart/form-data even without images (httpx would otherwise urlencode).
                files: list[tuple[str, tuple[str | None, Any, str]]] = [
                    ("spec", (None, document, "application/json"))
                ]
                files += [
                    ("images", (p.name, stack.enter_context(p.open("rb")), _media_type(p)))
                    for p in paths
                ]
                response = self._request("POST", "/v1/jobs", files=files)
            if response.status_code != _BUSY or attempt == self.busy_retries:
                break
            self._sleep(_retry_after(response) or self.backoff * 2**attempt)
        return _json_or_raise(response)

    def get_job(self, job_id: str, *, wait: float = 0.0) -> Job:
        """The job record; with ``wait`` (seconds, 0–30: the service answers 422 beyond) the
        service holds its answer until the job has ended or the time is up (long polling).
        The wait must stay below the HTTP client's read timeout."""
        params = {"wait": wait} if wait > 0 else None
        return self._get_json(f"/v1/jobs/{_segment(job_id)}", params=params)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of jobs: ``{"items": [...], "next_cursor": ...}``."""
        query = {"status": status, "kind": kind, "limit": limit, "cursor": cursor}
        params = {k: v for k, v in query.items() if v is not None}
        return self._get_json("/v1/jobs", params=params)

    def cancel(self, job_id: str) -> Job:
        """Ask the service to cancel a job (409 :class:`ApiError` if it already finished)."""
        return self._send("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 0.5,
        timeout: float | None = 3600.0,
        on_progress: JobCallback | None = None,
    ) -> Job:
        """Wait for a job to end; return it when it succeeded.

        Without ``on_progress`` this long-polls (:meth:`get_job` with ``wait``), so the answer
        comes the moment the job ends and costs the service one request per
        :data:`LONG_POLL_S`. ``on_progress`` receives the job record whenever its status,
        progress or ``attempts`` (runs started; more than one when a worker died under it)
        changed, so with it the job is polled every ``poll_interval`` seconds instead.
        Raises :class:`JobFailedError` / :class:`JobCancelledError` when it ended otherwise,
        and :class:`JobTimeoutError` after ``timeout`` seconds (``None``: wait forever).
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seen: object = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            hold = self._long_poll_hold(remaining) if on_progress is None else 0.0
            asked = time.monotonic()
            job = self.get_job(job_id, wait=hold)
            seen = (job.get("status"), job.get("progress"), job.get("attempts"))
            if on_progress is not None and seen != last_seen:
                on_progress(job)
            last_seen = seen
            _raise_if_unsuccessful(job)
            if job.get("status") == "succeeded":
                return job
            if deadline is not None and deadline - time.monotonic() <= 0:
                raise JobTimeoutError(job, timeout or 0.0)
            if time.monotonic() - asked < min(hold, poll_interval) or not hold:
                # Polling, or a server that answered a long poll at once (one without it).
                left = poll_interval if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(poll_interval, left)))

    def _long_poll_hold(self, remaining: float | None) -> float:
        """Seconds a long poll may ask the service to hold: within ``remaining`` and well
        inside this client's read timeout, which would otherwise cut the held request off;
        0 (plain polling) when that leaves less than a second."""
        hold = LONG_POLL_S if remaining is None else min(LONG_POLL_S, remaining)
        read = self._http.timeout.read
        if read is not None:
            hold = min(hold, read - _READ_MARGIN_S)
        return hold if hold >= 1.0 else 0.0

    # -- artifacts -----------------------------------------------------------------------

    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's artifact files: ``[{name, size, media_type, url}, ...]``."""
        return list(self._get_json(f"/v1/jobs/{_segment(job_id)}/artifacts")["items"])

    def download_artifacts(self, job_id: str, out_dir: PathLike) -> list[Path]:
        """Download every artifact of a job into ``out_dir`` (created); returns the paths.

        Files are written under a temporary name and renamed when complete, so an interrupted
        download never leaves a truncated file under the final name.
        """
        target = Path(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for item in self.list_artifacts(job_id):
            name = _safe_filename(str(item["name"]))
            url = item.get("url") or f"/v1/jobs/{_segment(job_id)}/artifacts/{quote(name)}"
            written.append(self._download(str(url), target / name))
        return written

    # -- transport -----------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        """One request, never retried (POST/DELETE); the JSON body, or None for 204."""
        return _json_or_raise(self._request(method, url, **kwargs))

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request (read in full); a connection failure is :class:`ServiceUnreachableError`."""
        try:
            return self._http.request(method, url, headers=self._headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachableError(_describe(exc, method, url)) from exc

    def _get_json(self, url: str, **kwargs: Any) -> Any:
        with self._get(url, **kwargs) as response:
            response.read()
            return _json_or_raise(response)

    def _download(self, url: str, path: Path) -> Path:
        partial = path.with_name(f".{path.name}.part")
        try:
            with self._get(url) as response, partial.open("wb") as handle:
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                for chunk in response.iter_bytes(_CHUNK):
                    handle.write(chunk)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @contextmanager
    def _get(self, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed GET, retried on connection errors and 503 with exponential backoff."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                request = self._http.build_request("GET", url, headers=self._headers, **kwargs)
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if last:
                    raise ServiceUnreachableError(_describe(exc, "GET", url)) from exc
                self._sleep(self.backoff * 2**attempt)
                continue
            if response.status_code in _RETRY_STATUSES and not last:
                delay = _retry_after(response) or self.backoff * 2**attempt
                response.close()
                self._sleep(delay)
                continue
            try:
                yield response
            finally:
                response.close()
            return


def _json_or_raise(response: httpx.Response) -> Any:
    if response.is_error:
        raise ApiError.from_response(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a numeric ``Retry-After`` header (HTTP dates are ignored)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _describe(exc: httpx.TransportError, method: str, url: str) -> str:
    return f"cannot reach the service ({method} {url}): {type(exc).__name__}: {exc}"


def _raise_if_unsuccessful(job: Job) -> None:
    status = job.get("status")
    if status == "failed":
        raise JobFailedError(job)
    if status == "cancelled":
        raise JobCancelledError(job)


def _segment(value: str) -> str:
    """Quote an id for use as one path segment (ids like ``sha256:…`` keep their colon)."""
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe=":")


def _existing_file(path: PathLike, argument: str) -> Path:
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{argument}: no such file: {source}")
    return source


def _media_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _safe_filename(name: str) -> str:
    """Refuse artifact names that would escape the output folder."""
    if not name or name in {".", ".."} or Path(name).name != name or "\\" in name:
        raise ClientError(f"refusing unsafe artifact name from the service: {name!r}")
    return name


@contextmanager
def _dataset_archive(source: Path) -> Iterator[tuple[str, BinaryIO | IO[bytes]]]:
    """Yield ``(filename, open handle)`` of a zip of ``source``: the file itself when it is a
    zip, else a temporary archive of the folder with class folders at its root."""
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ValueError(f"path: not a zip archive: {source}")
        with source.open("rb") as handle:
            yield source.name, handle
        return
    if not source.is_dir():
        raise FileNotFoundError(f"path: no such file or folder: {source}")
    with tempfile.TemporaryFile(suffix=".zip") as handle:
        # Images are already compressed: storing them is as small and far faster.
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for file in sorted(source.rglob("*")):
                relative = file.relative_to(source)
                if file.is_file() and not any(p.startswith(".") for p in relative.parts):
                    archive.write(file, relative.as_posix())
        handle.seek(0)
        yield f"{source.name or 'dataset'}.zip", handle
