"""End to end with real processes: a Celery worker on a real Redis behind the gateway, and the
embedded single-machine deployment (`camres serve`). Every process started here is stopped by
a fixture finalizer, also when the test fails."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.store import TERMINAL
from service.store.sqlite import SQLiteJobStore
from tests.service.support import (
    REPO_ROOT,
    camres_command,
    free_port,
    stop_process,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.integration

STARTUP_TIMEOUT = 90.0
JOB_TIMEOUT = 90.0


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start(command: list[str], log: Path, **settings: object) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=subprocess_env(**settings), stdout=out, stderr=out
        )


def wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, f"process exited early:\n{log_tail(log)}"
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, STARTUP_TIMEOUT, f"readiness\n{log_tail(log)}", step=0.25)


def submit(client: httpx.Client, spec: dict[str, Any], images: list[Path] = ()) -> str:  # type: ignore[assignment]
    files: list[tuple[str, Any]] = [("spec", (None, json.dumps(spec)))]
    files += [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    response = client.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job_id: str = response.json()["id"]
    return job_id


def wait_finished(client: httpx.Client, job_id: str, log: Path) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def done() -> bool:
        nonlocal job
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job["status"] in TERMINAL

    wait_for(done, JOB_TIMEOUT, f"job {job_id} to finish\n{log_tail(log)}", step=0.2)
    return job


def exercise_service(client: httpx.Client, checkpoint: Path, image: Path, log: Path) -> None:
    """The flow both deployments must support: upload a model, run a CAM job on a real image,
    download its overlay; a failing job fails with the core's error and the worker goes on."""
    upload = client.post(
        "/v1/models", files={"file": ("tiny.safetensors", checkpoint.read_bytes())}
    )
    assert upload.status_code == 201, upload.text
    model = upload.json()["id"]

    bad_damage = {
        "kind": "damage",
        "model": model,
        "damage": {"targets": ["nope.*"], "fraction": 0.1},
    }
    failing = submit(client, bad_damage)
    damage = {"targets": ["D4"], "fraction": 0.5}
    cam_spec = {"kind": "cam", "model": model, "cam": {"top_k": 2}, "damage": damage}
    cam = submit(client, cam_spec, [image])

    failed = wait_finished(client, failing, log)
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "DamageSpecError"
    assert "nope" in failed["error"]["message"]

    job = wait_finished(client, cam, log)
    assert job["status"] == "succeeded", f"{job}\n{log_tail(log)}"
    assert job["progress"]["fraction"] == 1.0
    [entry] = job["result"]["images"]
    intact, damaged = entry["conditions"]["intact"], entry["conditions"]["damaged"]
    assert job["result"]["damage"]["damaged"] > 0
    width, height = Image.open(image).size
    assert (intact["width"], intact["height"]) == (width, height)
    assert len(intact["cams"]) == len(damaged["cams"]) == 2
    for class_cam in intact["cams"] + damaged["cams"]:
        for box in class_cam["boxes"]:
            assert 0 <= box["x0"] < box["x1"] <= width
            assert 0 <= box["y0"] < box["y1"] <= height

    listed = client.get(f"/v1/jobs/{cam}/artifacts").json()["items"]
    names = {a["name"]: a for a in listed}
    for condition in (intact, damaged):
        overlay = names[condition["cams"][0]["artifacts"]["overlay"]]
        assert overlay["media_type"] == "image/png"
        download = client.get(overlay["url"])
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(download.content)) as png:
            assert png.format == "PNG"
            assert png.size == (width, height)
    metrics = client.get("/metrics").text
    assert 'camres_jobs_finished_total{kind="cam",status="succeeded"} 1.0' in metrics
    assert 'camres_jobs_finished_total{kind="damage",status="failed"} 1.0' in metrics


@pytest.fixture
def redis_deployment(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> Iterator[tuple[Settings, Path]]:
    """A real worker process on a real Redis (key prefix unique to this test)."""
    settings = Settings(
        data_dir=tmp_path / "var",
        broker_url=redis_url,
        redis_prefix=redis_prefix,
        heartbeat_interval=1.0,
    )
    log = tmp_path / "worker.log"
    worker = start(
        camres_command(
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--hostname",
            f"{redis_prefix}@%h",
            "--loglevel",
            "INFO",
        ),
        log,
        data_dir=settings.data_dir,
        broker_url=redis_url,
        redis_prefix=redis_prefix,
        heartbeat_interval=1.0,
    )
    try:
        yield settings, log
        assert worker.poll() is None, f"the worker died:\n{log_tail(log)}"
    finally:
        stop_process(worker)


def test_worker_on_redis(
    redis_deployment: tuple[Settings, Path], tiny_checkpoint: Path, ucm_image: Path
) -> None:
    settings, log = redis_deployment
    with TestClient(create_app(settings)) as client:
        wait_for(
            lambda: client.get("/readyz").status_code == 200,
            STARTUP_TIMEOUT,
            f"the worker's heartbeat\n{log_tail(log)}",
            step=0.25,
        )
        exercise_service(client, tiny_checkpoint, ucm_image, log)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, Path]]:
    """`camres serve` on a free loopback port, its data folder in tmp_path."""
    port = free_port()
    data_dir = tmp_path / "var"
    log = tmp_path / "serve.log"
    serve = start(
        camres_command("serve", "--port", str(port), "--data-dir", str(data_dir)),
        log,
        heartbeat_interval=1.0,
    )
    try:
        yield serve, f"http://127.0.0.1:{port}", data_dir, log
    finally:
        stop_process(serve, timeout=30)


def test_embedded_serve(
    embedded: tuple[subprocess.Popen[bytes], str, Path, Path],
    tiny_checkpoint: Path,
    ucm_image: Path,
) -> None:
    serve, url, data_dir, log = embedded
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, serve, log)
        exercise_service(client, tiny_checkpoint, ucm_image, log)
    [beat] = SQLiteJobStore(data_dir / "camres.sqlite3").workers()
    worker_pid = beat.info["pid"]
    assert beat.name.startswith("embedded@")

    # SIGTERM stops the gateway and its worker cleanly.
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0, log_tail(log)

    def worker_gone() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(worker_gone, 10, f"worker {worker_pid} to exit\n{log_tail(log)}")
    # The broker folder holds no message left behind.
    assert list((data_dir / "broker" / "queue").glob("*.msg")) == []
