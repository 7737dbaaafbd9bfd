"""service.client against the real gateway, served by uvicorn on a loopback port.

No worker runs here, so jobs stay queued: that is enough for uploads, submission, listing,
cancellation, timeouts and the error mapping. Jobs that run end to end are in
tests/cli/test_submit.py (integration).
"""

from __future__ import annotations

import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import (
    ApiError,
    CamresClient,
    ClientError,
    JobCancelledError,
    JobFailedError,
    JobTimeoutError,
    ServiceUnreachableError,
    _safe_filename,
)
from service.settings import Settings
from service.store import JobStore, open_store
from tests.service.support import TINY_CLASSES, TINY_INPUT_SIZE, free_port

ALICE = "alice-key-0123456789abcdef"


@contextmanager
def serve_app(data_dir: Path, **settings: Any) -> Iterator[str]:
    """The gateway for ``data_dir`` (and other ``settings``) under uvicorn in a thread; yields
    its base URL."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=data_dir, **settings))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_app(tmp_path_factory.mktemp("gateway")) as url:
        yield url


@pytest.fixture
def api(base_url: str) -> Iterator[CamresClient]:
    with CamresClient(base_url, backoff=0.0) as client:
        yield client


@pytest.fixture(scope="module")
def uploaded(base_url: str, tiny_checkpoint: Path) -> str:
    """The id of the tiny checkpoint, uploaded once for the module."""
    with CamresClient(base_url) as api:
        return str(api.upload_model(tiny_checkpoint)["id"])


@pytest.fixture
def dataset_dir(ucm_dir: Path, tmp_path: Path) -> Path:
    """Two UC Merced classes, three real images each, plus a hidden file to be left out."""
    root = tmp_path / "tiny-ucm"
    for name in ("airplane", "beach"):
        (root / name).mkdir(parents=True)
        for source in sorted((ucm_dir / name).glob("*.jpg"))[:3]:
            shutil.copy(source, root / name / source.name)
    (root / ".DS_Store").write_bytes(b"\0junk")
    return root


def cam_spec(model: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "cam", "model": model, "cam": {"top_k": 1}, **extra}


# -- models ------------------------------------------------------------------------------


def test_upload_model_is_listed_and_readable(
    api: CamresClient, tiny_checkpoint: Path, uploaded: str
) -> None:
    info = api.upload_model(tiny_checkpoint)  # the same bytes again: the stored model
    assert info["id"] == uploaded
    assert uploaded.startswith("sha256:")
    assert info["arch"] == "resnet18"
    assert info["classes"] == TINY_CLASSES
    assert info["input_size"] == TINY_INPUT_SIZE
    assert api.get_model(uploaded) == info
    listed = {m["id"]: m for m in api.list_models()}
    assert listed[uploaded]["builtin"] is False
    assert any(m["builtin"] for m in listed.values())


def test_upload_of_a_non_checkpoint_is_a_422_naming_the_file(
    api: CamresClient, ucm_image: Path
) -> None:
    with pytest.raises(ApiError) as caught:
        api.upload_model(ucm_image)
    assert caught.value.status == 422
    assert [e.field for e in caught.value.errors] == ["file"]


# -- jobs --------------------------------------------------------------------------------


def test_submitted_cam_job_is_queued_readable_and_listed(
    api: CamresClient, uploaded: str, ucm_image: Path
) -> None:
    job = api.submit_job(cam_spec(uploaded), [ucm_image])
    assert job["status"] == "queued"
    assert job["kind"] == "cam"
    assert api.get_job(job["id"])["spec"]["model"] == uploaded
    page = api.list_jobs(kind="cam", status="queued", limit=500)
    assert job["id"] in [item["id"] for item in page["items"]]
    assert api.list_artifacts(job["id"]) == []


def test_a_job_without_images_is_still_sent_as_multipart(api: CamresClient, uploaded: str) -> None:
    # The gateway refuses non-multipart job submissions (415); a damage job has no files.
    job = api.submit_job({"kind": "damage", "model": uploaded, "damage": {"fraction": 0.1}})
    assert job["kind"] == "damage"
    assert job["status"] == "queued"


def test_unknown_job_maps_the_404_problem(api: CamresClient) -> None:
    with pytest.raises(ApiError) as caught:
        api.get_job("no-such-job")
    error = caught.value
    assert error.status == 404
    assert error.title == "Not Found"
    assert error.detail is not None
    assert "no-such-job" in error.detail
    assert error.instance == "/v1/jobs/no-such-job"
    assert error.method == "GET"
    assert str(error).startswith("404 Not Found: ")


def test_invalid_spec_maps_the_422_problem_with_its_fields(
    api: CamresClient, uploaded: str, ucm_image: Path
) -> None:
    spec = cam_spec(uploaded, damage={"fraction": 2.0})
    with pytest.raises(ApiError) as caught:
        api.submit_job(spec, [ucm_image])
    error = caught.value
    assert error.status == 422
    assert "spec.damage.fraction" in [e.field for e in error.errors]
    # The summary names each field once, even when the detail repeats the field errors.
    assert str(error).count("spec.damage.fraction") == 1


def test_cancelled_job_makes_wait_raise(api: CamresClient, uploaded: str, ucm_image: Path) -> None:
    job = api.submit_job(cam_spec(uploaded), [ucm_image])
    assert api.cancel(job["id"])["status"] == "cancelled"
    with pytest.raises(JobCancelledError) as caught:
        api.wait(job["id"], poll_interval=0.01, timeout=5)
    assert caught.value.job_id == job["id"]
    with pytest.raises(ApiError) as conflict:
        api.cancel(job["id"])
    assert conflict.value.status == 409


def test_wait_times_out_and_reports_changes_only(
    api: CamresClient, uploaded: str, ucm_image: Path
) -> None:
    job = api.submit_job(cam_spec(uploaded), [ucm_image])
    seen: list[str] = []
    with pytest.raises(JobTimeoutError) as caught:
        api.wait(
            job["id"],
            poll_interval=0.02,
            timeout=0.3,
            on_progress=lambda j: seen.append(j["status"]),
        )
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.job["status"] == "queued"
    assert seen == ["queued"]  # many polls, one unchanged state
    api.cancel(job["id"])


def test_wait_long_polls_in_one_request_until_the_job_ends(
    base_url: str, uploaded: str, ucm_image: Path
) -> None:
    requests: list[str] = []
    with counting_client(base_url, requests) as api, CamresClient(base_url) as other:
        job = api.submit_job(cam_spec(uploaded), [ucm_image])
        requests.clear()
        timer = threading.Timer(0.3, other.cancel, args=(job["id"],))
        started = time.monotonic()
        timer.start()
        with pytest.raises(JobCancelledError):
            api.wait(job["id"], timeout=10)
        seconds = time.monotonic() - started
        timer.join()
    assert requests == ["GET"]  # held by the service, answered when the job ended
    assert 0.3 <= seconds < 3.0


def test_long_polls_stay_inside_the_clients_read_timeout(
    base_url: str, uploaded: str, ucm_image: Path
) -> None:
    requests: list[str] = []
    http = httpx.Client(  # a read timeout too short to hold a poll in
        base_url=base_url,
        timeout=1.5,
        event_hooks={"request": [lambda request: requests.append(request.method)]},
    )
    with http, CamresClient(base_url, http_client=http) as api:
        job = api.submit_job(cam_spec(uploaded), [ucm_image])
        requests.clear()
        with pytest.raises(JobTimeoutError):  # not a read timeout of a held request
            api.wait(job["id"], poll_interval=0.2, timeout=2.0)
        polls = len(requests)
        api.cancel(job["id"])
    assert polls >= 5  # it polled every 0.2 s instead


def test_a_long_poll_answers_with_the_job_when_its_time_is_up(
    api: CamresClient, uploaded: str, ucm_image: Path
) -> None:
    job = api.submit_job(cam_spec(uploaded), [ucm_image])
    started = time.monotonic()
    assert api.get_job(job["id"], wait=0.3)["status"] == "queued"
    assert time.monotonic() - started >= 0.3
    api.cancel(job["id"])


@pytest.mark.parametrize("wait", ["-1", "31", "nan", "soon"])
def test_a_bad_wait_is_a_422_naming_it(base_url: str, wait: str) -> None:
    response = httpx.get(f"{base_url}/v1/jobs/any", params={"wait": wait})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == ["wait"]


def test_a_long_poll_of_an_unknown_job_is_a_404_at_once(base_url: str) -> None:
    started = time.monotonic()
    response = httpx.get(f"{base_url}/v1/jobs/nope", params={"wait": 10})
    assert response.status_code == 404
    assert time.monotonic() - started < 2


def test_download_of_a_job_without_artifacts_creates_the_folder(
    api: CamresClient, uploaded: str, ucm_image: Path, tmp_path: Path
) -> None:
    job = api.submit_job(cam_spec(uploaded), [ucm_image])
    out = tmp_path / "out" / "nested"
    assert api.download_artifacts(job["id"], out) == []
    assert out.is_dir()
    api.cancel(job["id"])


# -- datasets ----------------------------------------------------------------------------


def test_upload_dataset_zips_a_folder(api: CamresClient, dataset_dir: Path) -> None:
    info = api.upload_dataset(dataset_dir, name="tiny-ucm")
    assert info["name"] == "tiny-ucm"
    assert info["classes"] == ["airplane", "beach"]
    assert info["counts"] == {"airplane": 3, "beach": 3}
    assert info["num_images"] == 6
    assert info["id"] in [d["id"] for d in api.list_datasets()]


def test_upload_dataset_sends_a_zip_as_is(
    api: CamresClient, dataset_dir: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(dataset_dir.glob("*/*.jpg")):
            zf.write(file, file.relative_to(dataset_dir).as_posix())
    assert api.upload_dataset(archive)["num_images"] == 6


def test_upload_dataset_refuses_a_file_that_is_not_a_zip(
    api: CamresClient, ucm_image: Path
) -> None:
    with pytest.raises(ValueError, match="not a zip"):
        api.upload_dataset(ucm_image)


# -- transport: retries and errors -------------------------------------------------------


def counting_client(base_url: str, counter: list[str], **kwargs: Any) -> CamresClient:
    """A client whose every request attempt is recorded (method) through an httpx hook."""
    http = httpx.Client(
        base_url=base_url,
        timeout=5.0,
        event_hooks={"request": [lambda request: counter.append(request.method)]},
    )
    return CamresClient(base_url, http_client=http, **kwargs)


def test_api_key_is_sent_in_the_x_api_key_header_without_touching_the_callers_client(
    base_url: str,
) -> None:
    sent: list[httpx.Request] = []
    with httpx.Client(base_url=base_url, event_hooks={"request": [sent.append]}) as http:
        with CamresClient(base_url, api_key="s3cret", http_client=http) as api:
            api.health()
        assert sent[0].headers["X-API-Key"] == "s3cret"
        assert "Authorization" not in sent[0].headers
        assert "X-API-Key" not in http.headers
        assert not http.is_closed  # the caller's client is the caller's to close


# -- against a gateway with access control and a one-job limit ---------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, JobStore]]:
    """A gateway that needs API keys and admits one unfinished job per owner (429 beyond,
    Retry-After: 1), and its job store."""
    data_dir = tmp_path_factory.mktemp("secured")
    limits = {"api_keys": {ALICE: "alice"}, "max_active_jobs": 1, "busy_retry_after": 1}
    store = open_store(Settings(data_dir=data_dir))
    with serve_app(data_dir, **limits) as url:
        yield url, store
    store.close()


@pytest.fixture
def limited(secured: tuple[str, JobStore]) -> Iterator[tuple[str, JobStore]]:
    """The secured gateway, its one job slot freed after each test (whatever it left)."""
    yield secured
    store = secured[1]
    for status in ("queued", "running"):
        for record in store.list_jobs(status=status, limit=500).items:
            store.finish(record.id, "cancelled")


def test_the_key_opens_a_secured_service_and_no_key_is_a_401(
    limited: tuple[str, JobStore], tiny_checkpoint: Path
) -> None:
    url, _ = limited
    with CamresClient(url, api_key=ALICE) as alice:
        model = alice.upload_model(tiny_checkpoint)
        assert model["id"] in [m["id"] for m in alice.list_models()]
    for key in (None, "not-a-key-0123456789abcdef"):
        with CamresClient(url, api_key=key) as stranger, pytest.raises(ApiError) as caught:
            stranger.get_model(model["id"])
        assert caught.value.status == 401


def test_a_submission_refused_with_429_is_sent_again_after_retry_after(
    limited: tuple[str, JobStore], tiny_checkpoint: Path
) -> None:
    url, store = limited
    attempts: list[str] = []
    with counting_client(url, attempts, api_key=ALICE, busy_retries=3) as api:
        spec = {"kind": "damage", "model": api.upload_model(tiny_checkpoint)["id"]}
        spec["damage"] = {"fraction": 0.1}
        first = api.submit_job(spec)
        waits: list[float] = []

        def first_one_finishes(seconds: float) -> None:
            # While the client waits, the job that holds the only slot ends.
            waits.append(seconds)
            store.finish(first["id"], "succeeded", result={})

        api._sleep = first_one_finishes
        attempts.clear()
        second = api.submit_job(spec)
    assert second["status"] == "queued"
    assert attempts == ["POST", "POST"]
    assert waits == [1.0]  # the gateway's Retry-After
    assert store.get(second["id"]) is not None


def test_a_submission_refused_with_429_is_retried_a_bounded_number_of_times(
    limited: tuple[str, JobStore], tiny_checkpoint: Path, ucm_image: Path
) -> None:
    url, store = limited
    attempts: list[str] = []
    with counting_client(url, attempts, api_key=ALICE, busy_retries=2) as api:
        model = api.upload_model(tiny_checkpoint)["id"]
        holder = api.submit_job(cam_spec(model), [ucm_image])
        waits: list[float] = []
        api._sleep = waits.append
        attempts.clear()
        with pytest.raises(ApiError) as caught:
            api.submit_job(cam_spec(model), [ucm_image])  # files are re-sent on each attempt
    assert caught.value.status == 429
    assert caught.value.type == "urn:camres:problem:too-many-jobs"
    assert attempts == ["POST"] * 3
    assert waits == [1.0, 1.0]
    [job] = [j for j in store.list_jobs(limit=500).items if j.status == "queued"]
    assert job.id == holder["id"]  # no refused attempt created a job


def test_other_errors_of_a_submission_are_not_retried(
    limited: tuple[str, JobStore], ucm_image: Path
) -> None:
    url, _ = limited
    attempts: list[str] = []
    api = counting_client(url, attempts, api_key=ALICE, busy_retries=3)
    with api, pytest.raises(ApiError) as caught:
        api.submit_job(cam_spec("sha256:unknown"), [ucm_image])
    assert caught.value.status == 422
    assert attempts == ["POST"]


def test_wait_reports_a_new_attempt_of_the_same_job(
    limited: tuple[str, JobStore], tiny_checkpoint: Path
) -> None:
    url, store = limited
    with CamresClient(url, api_key=ALICE) as api:
        model = api.upload_model(tiny_checkpoint)["id"]
        job = api.submit_job({"kind": "damage", "model": model, "damage": {"fraction": 0.1}})
        store.start(job["id"], "w1")
        seen: list[tuple[str, int]] = []

        def died_and_restarted(record: dict[str, Any]) -> None:
            seen.append((record["status"], record["attempts"]))
            if len(seen) == 1:  # its worker died; the task was delivered again
                store.start(job["id"], "w2")
            else:
                store.finish(job["id"], "failed", error=None)

        with pytest.raises(JobFailedError) as caught:
            api.wait(job["id"], poll_interval=0.01, timeout=10, on_progress=died_and_restarted)
    # Same status and progress, one more attempt: still a change worth reporting.
    assert seen[:2] == [("running", 1), ("running", 2)]
    assert caught.value.attempts == 2


def test_get_is_retried_on_503_then_raises_the_problem(base_url: str) -> None:
    attempts: list[str] = []
    with counting_client(base_url, attempts, retries=2, backoff=0.0) as api:
        # No worker has ever sent a heartbeat: the gateway is alive but not ready.
        with pytest.raises(ApiError) as caught:
            api.ready()
        assert api.health() == {"status": "ok"}
    assert caught.value.status == 503
    assert "worker" in caught.value.extensions["checks"]  # a problem extension member
    assert attempts == ["GET", "GET", "GET", "GET"]  # 3 for /readyz, 1 for /healthz


def test_connection_errors_are_retried_for_get_only(tmp_path: Path, tiny_checkpoint: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    attempts: list[str] = []
    with counting_client(closed, attempts, retries=2, backoff=0.0) as api:
        with pytest.raises(ServiceUnreachableError, match="cannot reach"):
            api.get_job("x")
        assert attempts == ["GET"] * 3
        attempts.clear()
        with pytest.raises(ServiceUnreachableError):
            api.upload_model(tiny_checkpoint)
        assert attempts == ["POST"]  # a POST is never repeated


def test_error_response_without_problem_body_keeps_status_and_text() -> None:
    request = httpx.Request("GET", "http://gateway/v1/jobs/abc")
    response = httpx.Response(502, text="<html>Bad gateway</html>", request=request)
    error = ApiError.from_response(response)
    assert (error.status, error.title, error.errors) == (502, "Bad Gateway", [])
    assert error.detail == "<html>Bad gateway</html>"
    assert error.url == "http://gateway/v1/jobs/abc"


@pytest.mark.parametrize("name", ["../evil.png", "a/b.png", "..", "", "dir\\x.png"])
def test_artifact_names_that_escape_the_folder_are_refused(name: str) -> None:
    with pytest.raises(ClientError, match="unsafe artifact name"):
        _safe_filename(name)


def test_client_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="retries"):
        CamresClient("http://127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError, match="busy_retries"):
        CamresClient("http://127.0.0.1:1", busy_retries=-1)
    with CamresClient("http://127.0.0.1:1") as api, pytest.raises(ValueError, match="poll"):
        api.wait("x", poll_interval=0)
