"""End to end with real processes: a Celery worker on a real Redis behind the gateway, and the
embedded single-machine deployment (`camres serve`). Every process started here is stopped by
a fixture finalizer, also when the test fails. (Crashes and restarts: test_faults.py.)"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.store.sqlite import SQLiteJobStore
from tests.service.support import (
    Api,
    camres_command,
    dataset_zip,
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_for,
    worker_command,
)

pytestmark = pytest.mark.integration


def exercise_service(
    api: Api, data_dir: Path, checkpoint: Path, image: Path, ucm_dir: Path
) -> None:
    """The flow both deployments must support: upload a model, run a CAM job on a real image,
    download its overlay; a task that raises fails its job with the error's type and message,
    and the worker goes on serving."""
    model = api.upload_model(checkpoint)
    dataset = api.upload_dataset(dataset_zip(ucm_dir, ["airplane", "beach"], 1))
    # The dataset's files vanish from the shared volume after admission: the task raises.
    shutil.rmtree(data_dir / "datasets" / dataset / "data")
    failing = api.submit({"kind": "evaluate", "model": model, "dataset": dataset})
    damage = {"targets": ["D4"], "fraction": 0.5}
    cam = api.submit(
        {"kind": "cam", "model": model, "cam": {"top_k": 2}, "damage": damage}, [image]
    )

    failed = api.finished(failing)
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "DatasetError"
    assert "does not exist" in failed["error"]["message"]

    job = api.finished(cam)
    assert job["status"] == "succeeded", f"{job}\n{log_tail(api.log)}"
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

    listed = api.client.get(f"/v1/jobs/{cam}/artifacts").json()["items"]
    names = {a["name"]: a for a in listed}
    for condition in (intact, damaged):
        overlay = names[condition["cams"][0]["artifacts"]["overlay"]]
        assert overlay["media_type"] == "image/png"
        download = api.client.get(overlay["url"])
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(download.content)) as png:
            assert png.format == "PNG"
            assert png.size == (width, height)
    metrics = api.client.get("/metrics").text
    assert 'camres_jobs_finished_total{kind="cam",status="succeeded"} 1.0' in metrics
    assert 'camres_jobs_finished_total{kind="evaluate",status="failed"} 1.0' in metrics


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
    worker = start_process(
        worker_command(f"{redis_prefix}@%h"),
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
    redis_deployment: tuple[Settings, Path], tiny_checkpoint: Path, ucm_image: Path, ucm_dir: Path
) -> None:
    settings, log = redis_deployment
    with TestClient(create_app(settings)) as client:
        api = Api(client, log)
        api.ready()
        exercise_service(api, settings.data_dir, tiny_checkpoint, ucm_image, ucm_dir)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, Path]]:
    """`camres serve` on a free loopback port, its data folder in tmp_path."""
    port = free_port()
    data_dir = tmp_path / "var"
    log = tmp_path / "serve.log"
    serve = start_process(
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
    ucm_dir: Path,
) -> None:
    serve, url, data_dir, log = embedded
    with httpx.Client(base_url=url, timeout=30) as client:
        api = Api(client, log)
        api.ready(serve)
        exercise_service(api, data_dir, tiny_checkpoint, ucm_image, ucm_dir)
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
