"""Cross-cutting HTTP behaviour: problem documents, body limits, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.limits import BodySizeLimitMiddleware, BodyTooLargeError
from service.settings import Settings

PROBLEM = "application/problem+json"


def test_unknown_route_and_wrong_method_are_problems(client: TestClient) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    assert missing.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "no route matches /v1/nothing-here",
        "instance": "/v1/nothing-here",
    }
    wrong = client.put("/v1/models")
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == PROBLEM
    assert "GET" in wrong.headers["allow"]
    assert "POST" in wrong.headers["allow"]


@pytest.fixture
def small_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "var", max_model_bytes=1000, max_request_bytes=100)
    with TestClient(create_app(settings)) as client:
        yield client


def test_declared_oversized_bodies_are_413(small_client: TestClient, settings: Settings) -> None:
    response = small_client.post("/v1/models", files={"file": ("m.safetensors", b"x" * 5000)})
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:camres:problem:content-too-large"
    assert "1,000 bytes" in response.json()["detail"]


def test_streamed_oversized_bodies_are_cut_off() -> None:
    """A body without Content-Length is refused when it crosses the limit, before the rest is
    read (ASGI level: the test client would buffer the whole body first)."""
    chunks = [b"x" * 1000] * 100
    consumed = 0

    async def receive() -> dict[str, object]:
        nonlocal consumed
        consumed += 1
        return {"type": "http.request", "body": chunks[consumed - 1], "more_body": consumed < 100}

    async def reader(scope: object, receive_: Any, send: object) -> None:
        while (await receive_()).get("more_body"):
            pass

    middleware = BodySizeLimitMiddleware(reader, lambda method, path: 5_000)
    scope = {"type": "http", "method": "POST", "path": "/v1/models", "headers": []}
    with pytest.raises(BodyTooLargeError):
        asyncio.run(middleware(scope, receive, None))  # type: ignore[arg-type]
    assert consumed == 6


def test_a_streamed_oversized_upload_is_a_413_problem(small_client: TestClient) -> None:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n'
        yield from [b"x" * 1000] * 20
        yield b"\r\n--b--\r\n"

    response = small_client.post(
        "/v1/models", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:camres:problem:content-too-large"


def test_other_bodies_get_the_small_default_limit(small_client: TestClient) -> None:
    response = small_client.post(
        "/v1/datasets/register", json={"path": "/" + "x" * 500, "name": "n"}
    )
    assert response.status_code == 413


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_recent_worker_heartbeat(client: TestClient, app: FastAPI) -> None:
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.headers["content-type"] == PROBLEM
    checks = not_ready.json()["checks"]
    assert checks["store"] == "ok"
    assert checks["broker"] == "ok"
    assert "no worker" in checks["worker"]

    store = app.state.camres.store
    store.heartbeat("w1@test", {"pid": 1})
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": dict.fromkeys(checks, "ok")}


def test_readyz_reports_a_stale_heartbeat(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", heartbeat_max_age=0.05)
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.camres.store.heartbeat("w1@test")
        time.sleep(0.2)
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "no heartbeat for" in response.json()["checks"]["worker"]


def test_readyz_reports_an_unreachable_broker(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        broker_url="redis://127.0.0.1:1/0",
        store_url=f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
    )
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.camres.store.heartbeat("w1@test")
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["store"] == "ok"
    assert checks["worker"] == "ok"
    assert checks["broker"] != "ok"


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_by_route_template_and_jobs(
    client: TestClient, model_id: str, ucm_image: Path, app: FastAPI
) -> None:
    client.get("/v1/models/sha256:" + "0" * 64)
    client.get("/v1/models/sha256:" + "1" * 64)
    spec = json.dumps({"kind": "cam", "model": model_id})
    job = client.post(
        "/v1/jobs",
        files=[("spec", (None, spec)), ("images", (ucm_image.name, ucm_image.read_bytes()))],
    ).json()
    store = app.state.camres.store
    store.start(job["id"], "w")
    store.finish(job["id"], "failed")
    store.heartbeat("w1@x")
    values = samples(client)
    route_404 = (("method", "GET"), ("route", "/v1/models/{model_id}"), ("status", "404"))
    assert values[("camres_http_requests_total", route_404)] == 2
    assert values[("camres_jobs_submitted_total", (("kind", "cam"),))] == 1
    assert values[("camres_jobs_finished_total", (("kind", "cam"), ("status", "failed")))] == 1
    assert 0 <= values[("camres_worker_heartbeat_age_seconds", (("worker", "w1@x"),))] < 60
    latency = (
        "camres_http_request_duration_seconds_count",
        (("method", "POST"), ("route", "/v1/jobs")),
    )
    assert values[latency] == 1
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    client.get("/no/such/route")
    assert samples(client)[("camres_http_requests_total", unmatched)] == 1


def test_long_polls_are_timed_apart_from_plain_reads(
    client: TestClient, model_id: str, ucm_image: Path, app: FastAPI
) -> None:
    spec = json.dumps({"kind": "cam", "model": model_id})
    job = client.post(
        "/v1/jobs",
        files=[("spec", (None, spec)), ("images", (ucm_image.name, ucm_image.read_bytes()))],
    ).json()
    client.get(f"/v1/jobs/{job['id']}")
    held = client.get(f"/v1/jobs/{job['id']}", params={"wait": 0.2})
    assert held.json()["status"] == "queued"
    app.state.camres.store.finish(job["id"], "cancelled")
    values = samples(client)

    def count(route: str) -> float:
        key = (("method", "GET"), ("route", route))
        return values[("camres_http_request_duration_seconds_count", key)]

    assert count("/v1/jobs/{job_id}") == 1
    assert count("/v1/jobs/{job_id}?wait") == 1
