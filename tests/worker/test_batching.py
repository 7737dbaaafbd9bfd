"""Micro-batching of CAM jobs (worker/batching.py): which jobs may share a forward pass, how a
leader takes them from the batch queue of a real broker (the embedded filesystem one, and
Redis), and that a batched job ends exactly as it would alone — its own record, progress,
artifacts and result — while a bad or cancelled job in a batch ends alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from celery.exceptions import TimeLimitExceeded
from fastapi.testclient import TestClient

from core.cam_options import CamOptions
from service.app import create_app
from service.queue import make_celery, send_job
from service.schemas import CamJobSpec
from service.settings import Settings
from service.store import JobRecord
from service.submission import MANIFEST, Manifest, cam_batchable
from tests.service.support import (
    TINY_CLASSES,
    Api,
    log_tail,
    pool_processes,
    start_process,
    stop_process,
    ucm_images,
    wait_for,
    worker_command,
)
from tests.worker.test_tasks import submit
from worker import batch_members, batching, runtime, tasks

WORKER = "test@batch"


@pytest.fixture
def model_id(svc: runtime.WorkerServices, tiny_checkpoint: Path) -> str:
    copy = svc.models.new_tmp_path()
    shutil.copyfile(tiny_checkpoint, copy)
    return svc.models.add(copy)[0].id


@pytest.fixture
def app(svc: runtime.WorkerServices) -> Iterator[Celery]:
    """A Celery app on this test's embedded broker folder."""
    celery = make_celery(svc.settings)
    yield celery
    batching._forget_broker()
    celery.close()


@pytest.fixture(scope="module")
def images(ucm_dir: Path) -> list[Path]:
    """Four real UC Merced images of different classes."""
    picked = ucm_images(ucm_dir, TINY_CLASSES, 2)
    return [paths[i] for i in range(2) for paths in picked.values()][:4]


def cam_spec(model: str, **options: Any) -> dict[str, Any]:
    return {"kind": "cam", "model": model, "cam": options}


def queue_jobs(app: Celery, svc: runtime.WorkerServices, specs: list[tuple[dict, Path]]) -> list:
    """Create the jobs and send them to the batch queue, as the gateway does."""
    ids = []
    for spec, image in specs:
        job_id = submit(svc, spec, [image])
        send_job(app, svc.settings, job_id, "cam", batchable=True)
        ids.append(job_id)
    return ids


def record(svc: runtime.WorkerServices, job_id: str) -> JobRecord:
    found = svc.store.get(job_id)
    assert found is not None
    return found


# --- which jobs are batched ----------------------------------------------------------------------
def test_only_intact_one_image_uploaded_cams_are_batchable() -> None:
    def spec(**extra: Any) -> CamJobSpec:
        return CamJobSpec.model_validate({"kind": "cam", "model": "m", **extra})

    assert cam_batchable(spec(), 1)
    assert cam_batchable(spec(cam={"top_k": 3}), 1)
    # A batch of max_size jobs must hold at most max_size images, even within the size.
    assert not cam_batchable(spec(), 2)
    assert not cam_batchable(spec(), 4)
    assert not cam_batchable(spec(damage={"targets": ["D4"], "fraction": 0.5}), 1)
    assert not cam_batchable(spec(images={"dataset": "d"}), 0)


def test_jobs_share_a_pass_only_with_equal_model_and_options() -> None:
    key = batching.batch_key("sha256:a", CamOptions())
    assert key == batching.batch_key("sha256:a", CamOptions(top_k=1))
    assert key != batching.batch_key("sha256:b", CamOptions())
    assert key != batching.batch_key("sha256:a", CamOptions(top_k=2))
    assert key != batching.batch_key("sha256:a", CamOptions(har_threshold=0.3))


def test_batchable_jobs_go_to_the_batch_queue_unless_batching_is_off(tmp_path: Path) -> None:
    for batching_on, suffix in ((True, "gpu-batch"), (False, "gpu")):
        settings = Settings(data_dir=tmp_path / str(batching_on), cam_batching=batching_on)
        settings.ensure_dirs()
        app = make_celery(settings)
        send_job(app, settings, "one", "cam", batchable=True)
        send_job(app, settings, "two", "cam")
        app.close()
        names = sorted(p.name.rsplit(".", 2)[1] for p in (settings.broker_dir / "queue").iterdir())
        assert names == sorted([suffix, "gpu"])


# --- taking jobs from the queue ------------------------------------------------------------------
def test_drain_takes_at_most_the_limit_and_waits_at_most_the_wait(
    app: Celery, svc: runtime.WorkerServices
) -> None:
    queue = svc.settings.cam_batch_queue
    for i in range(5):
        send_job(app, svc.settings, f"job-{i}", "cam", batchable=True)
    taken = batching.drain(app, queue, 3, wait=10.0)  # the limit ends it, not the wait
    assert len(taken) == 3
    started = time.monotonic()
    rest = batching.drain(app, queue, 10, wait=0.2)
    waited = time.monotonic() - started
    # Every job exactly once. Not in order: the embedded broker names its message files by
    # the millisecond, then by a random id, so messages sent within one millisecond come
    # back in any order.
    assert sorted(m.headers["id"] for m in taken + rest) == [f"job-{i}" for i in range(5)]
    assert 0.2 <= waited < 2.0
    batching.acknowledge(taken + rest)
    assert batching.drain(app, queue, 10, wait=0.0) == []


def test_a_foreign_message_in_the_batch_queue_ends_the_wait(
    app: Celery, svc: runtime.WorkerServices
) -> None:
    """The embedded broker, like Redis, hands a requeued message straight back: a leader that
    went on taking after putting one back would spin on it until its time limit."""
    queue = svc.settings.cam_batch_queue
    app.send_task("camres.not_a_cam", args=["x"], queue=queue)
    time.sleep(0.01)  # the filesystem broker orders messages by the millisecond they came
    send_job(app, svc.settings, "job-0", "cam", batchable=True)
    time.sleep(0.01)
    drained: list[list[Any]] = []
    leader = threading.Thread(
        target=lambda: drained.append(batching.drain(app, queue, 10, wait=0.2)), daemon=True
    )
    leader.start()
    leader.join(5.0)
    assert not leader.is_alive(), "drain kept taking the message it put back"
    assert drained == [[]]  # put back, and the leader stopped taking
    # Nothing lost: the CAM job comes next, the foreign message is put back again.
    taken = batching.drain(app, queue, 10, wait=0.0)
    assert [m.headers["id"] for m in taken] == ["job-0"]
    batching.acknowledge(taken)
    [left] = (svc.settings.broker_dir / "queue").iterdir()
    assert json.loads(left.read_text())["headers"]["task"] == "camres.not_a_cam"


def test_a_message_held_when_the_time_limit_fires_goes_back(
    app: Celery, svc: runtime.WorkerServices
) -> None:
    """The embedded broker deletes a message as it delivers it: one held, unacknowledged,
    when the soft time limit fires would wait for the worker's next start."""
    queue = svc.settings.cam_batch_queue
    for i in range(2):
        send_job(app, svc.settings, f"job-{i}", "cam", batchable=True)
    taken: list[str] = []

    def take(message: Any) -> bool:
        if taken:
            raise SoftTimeLimitExceeded()  # before this one is recorded and acked
        batching.acknowledge([message])
        taken.append(message.headers["id"])
        return True

    with pytest.raises(SoftTimeLimitExceeded):
        batching.drain(app, queue, 10, wait=0.0, take=take)
    assert len(taken) == 1
    again = batching.drain(app, queue, 10, wait=0.0)
    # the acked one stays taken; the other is back (in either order: see the test above)
    assert [m.headers["id"] for m in again] == [{"job-0": "job-1", "job-1": "job-0"}[taken[0]]]
    batching.acknowledge(again)


def test_drained_messages_come_back_unless_acknowledged(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Redis: a leader that dies (its connection gone) before acking loses no job."""
    settings = Settings(data_dir=tmp_path / "var", broker_url=redis_url, redis_prefix=redis_prefix)
    app = make_celery(settings)
    try:
        for i in range(2):
            send_job(app, settings, f"job-{i}", "cam", batchable=True)
        taken = batching.drain(app, settings.cam_batch_queue, 5, wait=0.05)
        assert len(taken) == 2
        batching._forget_broker()  # as the connection of a dead process: nothing acked
        again = batching.drain(app, settings.cam_batch_queue, 5, wait=0.05)
        assert sorted(m.headers["id"] for m in again) == ["job-0", "job-1"]
        batching.acknowledge(again)
        batching._forget_broker()
        assert batching.drain(app, settings.cam_batch_queue, 5, wait=0.05) == []
    finally:
        batching._forget_broker()
        app.close()


# --- batched jobs end as they would alone --------------------------------------------------------
def artifact_files(svc: runtime.WorkerServices, job_id: str) -> list[str]:
    return sorted(p.name for p in (svc.settings.artifacts_dir / job_id).iterdir())


def assert_same_result(a: Any, b: Any, path: str = "result") -> None:
    """Equal JSON, floats up to float32 tolerance (a batch of 4 may take other kernels)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_result(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_result(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_batched_jobs_match_their_unbatched_runs(
    app: Celery, svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    two = cam_spec(model_id, top_k=2)
    specs = [(two, image) for image in images[:3]] + [(cam_spec(model_id), images[3])]
    ids = queue_jobs(app, svc, specs)
    leader, drained = ids[0], ids[1:]
    # The leader's message was taken by Celery; the others wait in the queue.
    assert batching.drain(app, svc.settings.cam_batch_queue, 1, 0.0)[0].headers["id"] == leader
    summary = batching.run_batch(app, svc.settings, WORKER, leader, tasks.run_cam)
    assert summary == {"job": leader, "batch_jobs": 4}

    alone = [submit(svc, spec, [image]) for spec, image in specs]
    for job_id in alone:
        assert tasks.cam.apply(args=[job_id]).get()["status"] == "succeeded"

    for batched, single in zip(ids, alone, strict=True):
        got, want = record(svc, batched), record(svc, single)
        assert got.status == "succeeded", got.error
        assert got.worker == WORKER
        assert got.attempts == 1
        assert_same_result(got.result, want.result)
        assert artifact_files(svc, batched) == artifact_files(svc, single)
        for npy in (n for n in artifact_files(svc, batched) if n.endswith(".npy")):
            np.testing.assert_allclose(
                np.load(svc.settings.artifacts_dir / batched / npy),
                np.load(svc.settings.artifacts_dir / single / npy),
                rtol=1e-4,
                atol=1e-5,
            )
        stored = json.loads((svc.settings.artifacts_dir / batched / "result.json").read_text())
        assert stored == got.result
        assert got.progress.fraction == 1.0
        assert got.progress.stage == "intact"
        assert want.progress.metrics == {}
    # Same model and options: one pass of three images; other options: a pass of its own.
    for job_id in ids[:3]:
        assert record(svc, job_id).progress.metrics == {"batch_size": 3, "batch_jobs": 3}
    assert record(svc, ids[3]).progress.metrics == {"batch_size": 1, "batch_jobs": 1}
    # Every drained message was recorded in the leader's batch and acknowledged: nothing
    # comes back.
    assert sorted(batch_members.members(svc.store, leader)) == sorted(drained)
    assert drained
    assert batching.drain(app, svc.settings.cam_batch_queue, 10, 0.0) == []


def test_a_bad_or_cancelled_job_ends_alone(
    app: Celery, svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    spec = cam_spec(model_id)
    ids = queue_jobs(app, svc, [(spec, image) for image in images])
    leader, missing, nameless, cancelled = ids
    batching.drain(app, svc.settings.cam_batch_queue, 1, 0.0)
    # Inputs the worker cannot read: fails before the pass.
    (svc.settings.uploads_dir / missing / MANIFEST).unlink()
    # An image the engine refuses: the shared pass fails, every job then runs its own.
    manifest_path = svc.settings.uploads_dir / nameless / MANIFEST
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    manifest.images[0].name = "   "
    manifest_path.write_text(manifest.model_dump_json())
    svc.store.request_cancel(cancelled)

    batching.run_batch(app, svc.settings, WORKER, leader, tasks.run_cam)

    assert record(svc, leader).status == "succeeded", record(svc, leader).error
    assert record(svc, leader).result["images"][0]["image"] == images[0].name  # type: ignore[index]
    assert record(svc, leader).progress.metrics == {}  # after the failed pass, its own
    failed = record(svc, missing)
    assert failed.status == "failed"
    assert failed.error is not None
    assert (failed.error.type, failed.error.field) == ("DatasetError", "images")
    refused = record(svc, nameless)
    assert refused.status == "failed"
    assert refused.error is not None
    assert (refused.error.type, refused.error.field) == ("InputError", "images")
    assert record(svc, cancelled).status == "cancelled"
    assert batching.drain(app, svc.settings.cam_batch_queue, 10, 0.0) == []


# --- a leader's process dies, or its time runs out ----------------------------------------------
def test_a_leader_delivered_again_runs_its_unfinished_members_first(
    app: Celery, svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    """As after a SIGKILL mid-batch: the leader and two members running (their messages gone),
    one member finished; the leader's task comes back."""
    spec = cam_spec(model_id)
    ids = queue_jobs(app, svc, [(spec, image) for image in [*images, images[0]]])
    leader, *members, late = ids
    running, finished = members[:2], members[2]
    # Attempt 1, up to the crash: the leader took its company, recorded and acked it.
    queue = svc.settings.cam_batch_queue
    assert batching.drain(app, queue, 1, 0.0)[0].headers["id"] == leader
    assert svc.store.start(leader, WORKER) is not None
    for job_id in members:
        assert batch_members.record(svc.store, leader, job_id, WORKER)
        assert svc.store.start(job_id, WORKER) is not None
    batching.acknowledge(batching.drain(app, queue, len(members), 0.0))
    svc.store.finish(finished, "succeeded", result={"done": "before the crash"})

    summary = batching.run_batch(app, svc.settings, WORKER, leader, tasks.run_cam)

    assert summary == {"job": leader, "batch_jobs": 3}  # the leader and its two unfinished
    for job_id in (leader, *running):
        got = record(svc, job_id)
        assert got.status == "succeeded", got.error
        assert got.attempts == 2
        assert got.progress.metrics == {"batch_size": 3, "batch_jobs": 3}
    assert record(svc, finished).result == {"done": "before the crash"}
    assert record(svc, finished).attempts == 1
    # Delivered again, the leader takes nobody new: the late job waits for its own leader.
    assert record(svc, late).status == "queued"
    assert [m.headers["id"] for m in batching.drain(app, queue, 10, 0.0)] == [late]


def test_a_leader_whose_job_does_not_run_takes_nobody(
    app: Celery, svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    spec = cam_spec(model_id)
    leader, *others = queue_jobs(app, svc, [(spec, image) for image in images[:3]])
    queue = svc.settings.cam_batch_queue
    batching.drain(app, queue, 1, 0.0)
    svc.store.request_cancel(leader)  # queued: cancelled at once, never runs

    summary = batching.run_batch(app, svc.settings, WORKER, leader, tasks.run_cam)

    assert summary == {"job": leader, "batch_jobs": 1}
    assert record(svc, leader).status == "cancelled"
    assert batch_members.members(svc.store, leader) == []
    assert [record(svc, job_id).status for job_id in others] == ["queued", "queued"]
    assert sorted(m.headers["id"] for m in batching.drain(app, queue, 10, 0.0)) == sorted(others)


def test_the_hard_time_limit_fails_the_leaders_unfinished_members_too(
    svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    spec = cam_spec(model_id)
    leader, running, waiting, done = (submit(svc, spec, [image]) for image in images)
    assert svc.store.start(leader, WORKER) is not None
    for job_id in (running, waiting, done):
        assert batch_members.record(svc.store, leader, job_id, WORKER)
    assert svc.store.start(running, WORKER) is not None
    assert svc.store.start(done, WORKER) is not None
    svc.store.finish(done, "succeeded", result={})

    # What the worker's main process calls when the pool kills the leader at the hard limit.
    tasks.cam.on_failure(TimeLimitExceeded(1.0), "task-id", [leader], {}, None)

    limit = svc.settings.task_time_limit
    for job_id in (leader, running, waiting):
        got = record(svc, job_id)
        assert got.status == "failed"
        assert got.error is not None
        assert (got.error.type, got.error.message) == (
            "TimeLimitExceeded",
            f"the job was stopped after {limit} s",
        )
    assert record(svc, done).status == "succeeded"


def test_the_soft_time_limit_while_the_leader_waits_fails_its_members_and_waits_on(
    svc: runtime.WorkerServices, model_id: str, images: list[Path]
) -> None:
    """The limit (SIGUSR1, as billiard sends it) fires while the leader joins a member that
    waits for the pass: the member must not outlive the task, running on with no limit."""
    job_id = submit(svc, cam_spec(model_id), images[:1])
    batch = batching.Batch(4)
    batch.join(job_id)

    def body(ctx: runtime.JobContext, shared: batching.SharedForward) -> dict[str, Any]:
        shared(ctx, model_id, None, None, [], CamOptions())  # type: ignore[arg-type]
        return {}

    thread = threading.Thread(
        target=batching._member, args=(batch, job_id, WORKER, body, None), daemon=True
    )
    thread.start()
    wait_for(lambda: job_id in batch._shares, 5, "the member to hand its inputs", 0.01)

    def expire(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(SoftTimeLimitExceeded):
            batching._join(batch, [thread])
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    thread.join(5.0)  # as the pool process would go on to its next task
    failed = record(svc, job_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "TimeLimitExceeded"


# --- a real worker -------------------------------------------------------------------------------
@pytest.mark.integration
def test_worker_on_redis_runs_concurrent_jobs_as_one_batch(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    tiny_checkpoint: Path,
    images: list[Path],
) -> None:
    jobs = 6
    # A long wait makes the batch deterministic: the leader stops once all others are taken.
    env = {"broker_url": redis_url, "redis_prefix": redis_prefix, "heartbeat_interval": 1.0}
    batch_env = {"cam_batch_wait_ms": 5000, "cam_batch_max_size": jobs}
    settings = Settings(data_dir=tmp_path / "var", **env, **batch_env)  # type: ignore[arg-type]
    log = tmp_path / "worker.log"
    worker = start_process(
        worker_command(f"{redis_prefix}@%h"), log, data_dir=settings.data_dir, **env, **batch_env
    )
    try:
        with TestClient(create_app(settings)) as client:
            api = Api(client, log)
            api.ready()
            model = api.upload_model(tiny_checkpoint)
            sent = [images[i % len(images)] for i in range(jobs)]
            ids = [api.submit({"kind": "cam", "model": model}, [image]) for image in sent]
            for job_id, image in zip(ids, sent, strict=True):
                job = api.finished(job_id)
                assert job["status"] == "succeeded", f"{job}\n{log_tail(log)}"
                [entry] = job["result"]["images"]
                assert entry["image"] == image.name
                assert job["progress"]["metrics"] == {"batch_size": jobs, "batch_jobs": jobs}
                names = {
                    a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
                }
                assert entry["conditions"]["intact"]["cams"][0]["artifacts"]["overlay"] in names
        assert f"batched CAM pass: {jobs} jobs, {jobs} images" in log.read_text()
        assert worker.poll() is None, log_tail(log)
    finally:
        stop_process(worker)


@pytest.mark.integration
def test_a_batch_whose_pool_process_is_killed_runs_again_at_once(
    tmp_path: Path, tiny_checkpoint: Path, images: list[Path]
) -> None:
    """Embedded broker, which deletes a message as it delivers it: without the leader's record
    the members taken by a killed process would wait for the worker's next start."""
    # The leader waits (up to 10 s) for more jobs than come: the test kills it then, while
    # every job of the batch runs and waits for the pass.
    env = {"heartbeat_interval": 1.0, "cam_batch_wait_ms": 10_000, "cam_batch_max_size": 8}
    settings = Settings(data_dir=tmp_path / "var", **env)  # type: ignore[arg-type]
    log = tmp_path / "worker.log"
    worker = start_process(worker_command("crash@%h"), log, data_dir=settings.data_dir, **env)
    try:
        with TestClient(create_app(settings)) as client:
            api = Api(client, log)
            api.ready(worker)
            model = api.upload_model(tiny_checkpoint)
            ids = [api.submit({"kind": "cam", "model": model}, [image]) for image in images]
            store = client.app.state.camres.store  # type: ignore[attr-defined]

            def all_running() -> bool:
                jobs = [store.get(job_id) for job_id in ids]
                assert all(job.attempts <= 1 for job in jobs), jobs
                return all(job.status == "running" for job in jobs)

            wait_for(all_running, 60, f"the batch to run\n{log_tail(log)}", 0.05)
            [beat] = store.workers()
            [child] = pool_processes(beat.info["pid"])
            os.kill(child, signal.SIGKILL)

            def rerun() -> bool:  # Celery requeues the leader once worker_lost_wait (10 s) ends
                return any(store.get(job_id).attempts == 2 for job_id in ids)

            wait_for(rerun, 60, f"the leader to run again\n{log_tail(log)}", 0.05)
            again = time.monotonic()
            finished = [api.finished(job_id) for job_id in ids]
            elapsed = time.monotonic() - again
        for job in finished:
            assert job["status"] == "succeeded", f"{job}\n{log_tail(log)}"
            assert job["attempts"] == 2  # the body ran once more, no more
            assert job["progress"]["metrics"] == {"batch_size": 4, "batch_jobs": 4}
        # The leader, delivered again, runs its batch at once, without waiting for company.
        assert elapsed < 8, f"{elapsed:.1f} s\n{log_tail(log)}"
        assert "leads its batch again" in log.read_text()
        assert worker.poll() is None, log_tail(log)
    finally:
        stop_process(worker)
