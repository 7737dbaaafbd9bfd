"""Faults with real processes: pool processes SIGKILLed mid-job, a whole embedded worker killed,
Redis restarted with jobs queued, the gateway restarted. Nothing may be lost, no job may stay
``running`` forever, and a job that keeps killing its worker fails with that reason.

The Redis tests use a private ``redis-server`` (append-only file, on a free port), never the
machine's shared one; every process started here is stopped by a fixture finalizer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.store import JobStore
from service.store.sqlite import SQLiteJobStore
from tests.service.support import (
    TINY_CLASSES,
    Api,
    camres_command,
    dataset_zip,
    free_port,
    log_tail,
    pool_processes,
    start_process,
    stop_process,
    ucm_images,
    wait_for,
    worker_command,
)

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 2
#: Enough work that a job is still running when the test kills its process.
LONG_CAM_CLASSES = ["agricultural", "airplane", "beach", "buildings", "forest", "harbor"]
RETRAINING = {
    "epochs": 25,
    "batch_size": 4,
    "lr": 0.01,
    "val_fraction": 0.0,
    "test_fraction": 0.0,
    "device": "cpu",
    "amp": False,
}


class RedisServer:
    """A private redis-server with an append-only file, restartable on the same port and data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                 str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", ""],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_for(self._answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)  # SIGTERM: redis flushes its append-only file and exits
            self.process = None

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Cluster:
    """A worker process on the private Redis behind an in-process gateway."""

    api: Api
    store: JobStore
    settings: Settings
    model: str
    dataset: str
    images: list[Path]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Path,
    ucm_dir: Path,
) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    options: dict[str, Any] = {
        "data_dir": folder / "var",
        "broker_url": redis_server.url,
        "heartbeat_interval": 1.0,
        "max_attempts": MAX_ATTEMPTS,
    }
    settings = Settings(**options)
    log = folder / "worker.log"
    worker = start_process(worker_command("faults@%h"), log, **options)
    try:
        with TestClient(create_app(settings)) as client:
            api = Api(client, log)
            api.ready(worker)
            yield Cluster(
                api=api,
                store=client.app.state.camres.store,  # type: ignore[attr-defined]
                settings=settings,
                model=api.upload_model(tiny_checkpoint),
                dataset=api.upload_dataset(dataset_zip(ucm_dir, TINY_CLASSES, 4)),
                images=[p for ps in ucm_images(ucm_dir, LONG_CAM_CLASSES, 10).values() for p in ps],
            )
        assert worker.poll() is None, f"the worker died:\n{log_tail(log)}"
    finally:
        stop_process(worker)


def kill_pool_process_of(cluster: Cluster, job_id: str, attempt: int) -> None:
    """SIGKILL the pool process running attempt ``attempt`` of the job (the worker's main
    process survives and notices)."""

    def running() -> bool:
        record = cluster.store.get(job_id)
        assert record is not None
        assert record.status in ("queued", "running"), record
        return record.status == "running" and record.attempts == attempt

    wait_for(running, 120, f"attempt {attempt} of job {job_id}\n{log_tail(cluster.api.log)}", 0.05)
    [beat] = cluster.store.workers()
    [child] = pool_processes(beat.info["pid"])
    os.kill(child, signal.SIGKILL)


def test_a_cam_job_whose_pool_process_is_killed_runs_again(cluster: Cluster) -> None:
    spec = {
        "kind": "cam",
        "model": cluster.model,
        "cam": {"top_k": 3},
        "damage": {"targets": ["D3", "D4"], "fraction": 0.3},
    }
    job_id = cluster.api.submit(spec, cluster.images)
    kill_pool_process_of(cluster, job_id, attempt=1)
    job = cluster.api.finished(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["images"]) == len(cluster.images)
    record = cluster.store.get(job_id)
    assert record is not None
    assert record.attempts == 2


def damaged_model(cluster: Cluster) -> str:
    damage = cluster.api.submit(
        {"kind": "damage", "model": cluster.model, "damage": {"targets": ["D4"], "fraction": 0.3}}
    )
    job = cluster.api.finished(damage)
    assert job["status"] == "succeeded", job["error"]
    model: str = job["result"]["model"]
    return model


def test_a_retraining_job_whose_pool_process_is_killed_runs_again(cluster: Cluster) -> None:
    spec = {
        "kind": "retrain",
        "model": damaged_model(cluster),
        "dataset": cluster.dataset,
        "config": RETRAINING,
    }
    job_id = cluster.api.submit(spec)
    kill_pool_process_of(cluster, job_id, attempt=1)
    job = cluster.api.finished(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["details"]["train"]["history"]) == RETRAINING["epochs"]
    assert cluster.api.client.get(f"/v1/models/{job['result']['model']}").status_code == 200
    record = cluster.store.get(job_id)
    assert record is not None
    assert record.attempts == 2


def test_a_job_that_kills_its_worker_every_time_fails_with_the_reason(cluster: Cluster) -> None:
    spec = {
        "kind": "retrain",
        "model": damaged_model(cluster),
        "dataset": cluster.dataset,
        "config": RETRAINING,
    }
    job_id = cluster.api.submit(spec)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        kill_pool_process_of(cluster, job_id, attempt)
    job = cluster.api.finished(job_id)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "WorkerLostError"
    assert f"died {MAX_ATTEMPTS} times (limit {MAX_ATTEMPTS} attempts)" in job["error"]["message"]
    # The worker goes on serving.
    after = cluster.api.submit({"kind": "cam", "model": cluster.model}, cluster.images[:1])
    assert cluster.api.finished(after)["status"] == "succeeded"


def test_jobs_queued_across_a_redis_restart_all_complete(
    tmp_path: Path, tiny_checkpoint: Path, ucm_image: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    options: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "broker_url": server.url,
        "heartbeat_interval": 1.0,
    }
    log = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        with TestClient(create_app(Settings(**options))) as client:
            api = Api(client, log)
            model = api.upload_model(tiny_checkpoint)
            jobs = [api.submit({"kind": "cam", "model": model}, [ucm_image]) for _ in range(5)]
            server.stop()
            assert client.get(f"/v1/jobs/{jobs[0]}").status_code == 503  # the store is down
            server.start()
            assert [api.job(job)["status"] for job in jobs] == ["queued"] * 5
            worker = start_process(worker_command("restart@%h"), log, **options)
            finished = [api.finished(job) for job in jobs]
            assert [job["status"] for job in finished] == ["succeeded"] * 5, log_tail(log)
            store = client.app.state.camres.store  # type: ignore[attr-defined]
            assert [store.get(job).attempts for job in jobs] == [1] * 5  # each ran once
    finally:
        if worker is not None:
            stop_process(worker)
        server.stop()


def test_the_embedded_deployment_survives_killed_workers_and_restarted_gateway(
    tmp_path: Path, tiny_checkpoint: Path, ucm_dir: Path
) -> None:
    """`camres serve`: a killed pool process's job runs again at once; a worker that dies
    whole (SIGKILL to its process group) stops the gateway, and started again the deployment
    runs the interrupted job once more and still serves the earlier jobs' results."""
    port, data_dir, log = free_port(), tmp_path / "var", tmp_path / "serve.log"
    command = camres_command("serve", "--port", str(port), "--data-dir", str(data_dir))
    images = [p for ps in ucm_images(ucm_dir, LONG_CAM_CLASSES, 10).values() for p in ps]
    jobs = SQLiteJobStore(data_dir / "camres.sqlite3")
    serve = start_process(command, log, heartbeat_interval=1.0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            api = Api(client, log)
            api.ready(serve)
            model = api.upload_model(tiny_checkpoint)
            first = api.submit({"kind": "cam", "model": model}, images[:1])
            assert api.finished(first)["status"] == "succeeded"
            long_spec = {"kind": "cam", "model": model, "cam": {"top_k": 3}}
            [beat] = jobs.workers()

            rerun = api.submit(long_spec, images)
            api.wait(rerun, lambda job: job["status"] == "running", "to run")
            [child] = pool_processes(beat.info["pid"])
            os.kill(child, signal.SIGKILL)  # the worker puts the task back in the broker folder
            assert api.finished(rerun)["status"] == "succeeded"
            assert api.job(rerun)["attempts"] == 2

            long = api.submit(long_spec, images)
            api.wait(long, lambda job: job["status"] == "running", "to run")
            os.killpg(beat.info["pid"], signal.SIGKILL)  # the worker and its pool
            assert serve.wait(60) != 0, log_tail(log)  # the gateway stops with its worker

            serve = start_process(command, log, heartbeat_interval=1.0)
            api.ready(serve)
            job = api.finished(long)
            assert job["status"] == "succeeded", job["error"]
            assert len(job["result"]["images"]) == len(images)
            assert job["attempts"] == 2
            # The earlier job and its artifacts outlived both processes.
            artifacts = client.get(f"/v1/jobs/{first}/artifacts").json()["items"]
            assert "result.json" in {a["name"] for a in artifacts}
            download = client.get(f"/v1/jobs/{first}/artifacts/result.json")
            assert download.status_code == 200
            assert download.json() == api.job(first)["result"]
    finally:
        stop_process(serve, timeout=30)
