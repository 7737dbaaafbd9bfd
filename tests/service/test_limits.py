"""Limits on what one owner may hold and for how long: concurrent jobs (429 with Retry-After),
time limits handed to Celery, and the expiry of finished jobs and their artifacts."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.queue import make_celery
from service.retention import purge_expired
from service.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[TestClient, FastAPI]]:
    settings = Settings(
        data_dir=tmp_path / "var",
        api_keys={ALICE: "alice", BOB: "bob"},
        max_active_jobs=2,
        busy_retry_after=7,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app
    app.state.camres.close()


def submit(client: TestClient, key: str, model: str, image: Path) -> httpx.Response:
    spec = json.dumps({"kind": "cam", "model": model})
    return client.post(
        "/v1/jobs",
        headers={"X-API-Key": key},
        files=[("spec", (None, spec)), ("images", (image.name, image.read_bytes()))],
    )


def test_too_many_active_jobs_is_429_with_retry_after(
    limited: tuple[TestClient, FastAPI], tiny_checkpoint: Path, ucm_image: Path
) -> None:
    client, app = limited
    settings: Settings = app.state.camres.settings
    models = {}
    for key in (ALICE, BOB):
        upload = client.post(
            "/v1/models",
            headers={"X-API-Key": key},
            files={"file": ("m.safetensors", tiny_checkpoint.read_bytes())},
        )
        models[key] = upload.json()["id"]
    first, second = (submit(client, ALICE, models[ALICE], ucm_image) for _ in range(2))
    assert (first.status_code, second.status_code) == (202, 202)

    busy = submit(client, ALICE, models[ALICE], ucm_image)
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "7"
    assert busy.headers["content-type"] == "application/problem+json"
    problem = busy.json()
    assert problem["type"] == "urn:camres:problem:too-many-jobs"
    assert "owner 'alice' already has 2 queued or running jobs" in problem["detail"]
    # Nothing of the refused job was kept; Bob is not affected by Alice's jobs.
    assert len(list(settings.uploads_dir.iterdir())) == 2
    assert submit(client, BOB, models[BOB], ucm_image).status_code == 202

    # A job that finishes frees its place.
    cancelled = client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers={"X-API-Key": ALICE})
    assert cancelled.status_code == 202
    assert submit(client, ALICE, models[ALICE], ucm_image).status_code == 202


def test_time_limits_and_redelivery_reach_celery(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:6379/0",
        task_soft_time_limit=60,
        task_time_limit=90,
        broker_visibility_timeout=120,
    )
    conf = make_celery(settings).conf
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (60, 90)
    assert conf.broker_transport_options["visibility_timeout"] == 120
    assert conf.task_acks_late
    assert conf.task_reject_on_worker_lost
    default = make_celery(Settings(data_dir=tmp_path, broker_url="redis://x:6379/0")).conf
    assert default.broker_transport_options["visibility_timeout"] == 6 * 3600 + 300 + 600


def test_finished_jobs_expire_with_their_artifacts(
    client: TestClient, app: FastAPI, model_id: str, ucm_image: Path
) -> None:
    settings: Settings = app.state.camres.settings
    store = app.state.camres.store
    spec = json.dumps({"kind": "cam", "model": model_id})
    files = [("spec", (None, spec)), ("images", (ucm_image.name, ucm_image.read_bytes()))]
    done, waiting = (client.post("/v1/jobs", files=files).json()["id"] for _ in range(2))
    store.start(done, "w")
    store.finish(done, "succeeded", result={"images": []})
    (settings.artifacts_dir / done).mkdir(parents=True)
    (settings.artifacts_dir / done / "result.json").write_text("{}")

    assert purge_expired(store, settings) == []  # not a week old yet
    later = time.time() + settings.result_ttl + 1
    assert purge_expired(store, settings, now=later) == [done]
    assert client.get(f"/v1/jobs/{done}").status_code == 404
    assert not (settings.artifacts_dir / done).exists()
    assert client.get(f"/v1/jobs/{waiting}").json()["status"] == "queued"  # unfinished: kept
    metrics = client.get("/metrics").text
    assert 'camres_jobs_finished_total{kind="cam",status="succeeded"} 1.0' in metrics
    # A ttl of 0 keeps everything.
    forever = settings.model_copy(update={"result_ttl": 0})
    store.request_cancel(waiting)
    assert purge_expired(store, forever, now=later + 10**6) == []
