"""The job lifecycle around task bodies: statuses, errors, cancellation, progress, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from core.exceptions import CancelledError, DamageSpecError
from core.progress import Progress
from service.settings import Settings, get_settings
from service.store import JobRecord, JobStore
from worker import runtime


def queued(store: JobStore, job_id: str = "job1") -> str:
    store.create(JobRecord(id=job_id, kind="cam", spec={"kind": "cam"}))
    return job_id


def test_a_successful_body_succeeds_the_job(svc: runtime.WorkerServices) -> None:
    job_id = queued(svc.store)
    inputs = svc.settings.uploads_dir / job_id
    inputs.mkdir(parents=True)
    seen: dict[str, Any] = {}

    def body(ctx: runtime.JobContext) -> dict[str, Any]:
        seen["status"] = svc.store.get(ctx.job_id).status  # type: ignore[union-attr]
        seen["artifacts"] = ctx.artifacts
        return {"answer": 42}

    assert runtime.run_job(job_id, "w1", body) == {"job": job_id, "status": "succeeded"}
    record = svc.store.get(job_id)
    assert record is not None
    assert (record.status, record.result, record.worker) == ("succeeded", {"answer": 42}, "w1")
    assert seen["status"] == "running"
    assert seen["artifacts"] == svc.settings.artifacts_dir / job_id
    assert not inputs.exists()  # uploaded inputs are removed once the job is done


def test_errors_fail_the_job_and_the_worker_goes_on(svc: runtime.WorkerServices) -> None:
    def bad_input(ctx: runtime.JobContext) -> dict[str, Any]:
        raise DamageSpecError("no module matches 'layer9.*'", field="targets")

    def bug(ctx: runtime.JobContext) -> dict[str, Any]:
        return {"x": 1 / 0}

    runtime.run_job(queued(svc.store, "a"), "w", bad_input)
    runtime.run_job(queued(svc.store, "b"), "w", bug)
    runtime.run_job(queued(svc.store, "c"), "w", lambda ctx: {"ok": True})
    a, b, c = (svc.store.get(j) for j in "abc")
    assert a is not None
    assert a.status == "failed"
    assert a.error is not None
    assert (a.error.type, a.error.field) == ("DamageSpecError", "targets")
    assert "layer9" in a.error.message
    assert b is not None
    assert b.error is not None
    assert (b.status, b.error.type, b.error.message) == (
        "failed",
        "ZeroDivisionError",
        "division by zero",
    )
    assert c is not None
    assert c.status == "succeeded"


def test_a_job_cancelled_while_queued_is_skipped(svc: runtime.WorkerServices) -> None:
    job_id = queued(svc.store)
    svc.store.request_cancel(job_id)
    called = []
    summary = runtime.run_job(job_id, "w", lambda ctx: called.append(1) or {})  # type: ignore[func-returns-value]
    assert summary["status"] == "skipped"
    assert called == []
    assert svc.store.get(job_id).status == "cancelled"  # type: ignore[union-attr]


def test_cancelling_a_running_job_stops_it_at_the_next_check(svc: runtime.WorkerServices) -> None:
    job_id = queued(svc.store)

    def body(ctx: runtime.JobContext) -> dict[str, Any]:
        assert not ctx.should_stop()
        svc.store.request_cancel(ctx.job_id)  # what POST /cancel does meanwhile
        if ctx.should_stop():
            raise CancelledError("cancelled during test")
        return {}

    runtime.run_job(job_id, "w", body)
    record = svc.store.get(job_id)
    assert record is not None
    assert record.status == "cancelled"
    assert record.error is None


def test_a_redelivered_job_that_was_asked_to_stop_ends_cancelled(
    svc: runtime.WorkerServices,
) -> None:
    job_id = queued(svc.store)
    svc.store.start(job_id, "w-died")
    svc.store.request_cancel(job_id)
    assert runtime.run_job(job_id, "w2", lambda ctx: {})["status"] == "skipped"
    assert svc.store.get(job_id).status == "cancelled"  # type: ignore[union-attr]


def test_progress_is_throttled_but_stage_changes_and_completion_are_written(
    svc: runtime.WorkerServices,
) -> None:
    job_id = queued(svc.store)
    written: list[tuple[str, float]] = []
    real_set = svc.store.set_progress

    def spy(job: str, progress: Any) -> None:
        written.append((progress.stage, progress.fraction))
        real_set(job, progress)

    svc.store.set_progress = spy  # type: ignore[method-assign,assignment]

    def body(ctx: runtime.JobContext) -> dict[str, Any]:
        for i in range(1, 11):
            ctx.progress(Progress(i / 20, "train", f"step {i}", {"loss": 0.5, "obj": object()}))
        ctx.progress(Progress(0.6, "cam"))
        ctx.progress(Progress(1.0, "cam"))
        return {}

    runtime.run_job(job_id, "w", body)
    assert written == [("train", 0.05), ("cam", 0.6), ("cam", 1.0)]
    record = svc.store.get(job_id)
    assert record is not None
    assert record.progress.fraction == 1.0


def test_a_success_completes_the_last_reported_progress_even_if_throttled(
    svc: runtime.WorkerServices,
) -> None:
    job_id = queued(svc.store)

    def body(ctx: runtime.JobContext) -> dict[str, Any]:
        for i in range(1, 5):  # only the first is written: the others fall in the interval
            ctx.progress(Progress(i / 10, "sweep", f"cell {i}", {"cell": i}))
        return {}

    runtime.run_job(job_id, "w", body)
    record = svc.store.get(job_id)
    assert record is not None
    assert (record.progress.stage, record.progress.message) == ("sweep", "cell 4")
    assert (record.progress.fraction, record.progress.metrics) == (1.0, {"cell": 4})


def test_progress_metrics_are_kept_json_safe(svc: runtime.WorkerServices) -> None:
    import torch

    job_id = queued(svc.store)

    def body(ctx: runtime.JobContext) -> dict[str, Any]:
        ctx.progress(
            Progress(
                0.5, "train", metrics={"loss": torch.tensor(0.25), "epoch": 2, "weights": [1, 2]}
            )
        )
        assert svc.store.get(ctx.job_id).progress.metrics == {  # type: ignore[union-attr]
            "loss": 0.25,
            "epoch": 2,
        }
        return {}

    assert runtime.run_job(job_id, "w", body)["status"] == "succeeded"


def test_model_cache_is_lru_by_id() -> None:
    cache = runtime.ModelCache(maxsize=2)
    loads: list[str] = []

    def loader(name: str) -> Any:
        def load() -> Any:
            loads.append(name)
            return (name, None)

        return load

    assert cache.get("a", loader("a"))[0] == "a"
    cache.get("b", loader("b"))
    cache.get("a", loader("a"))  # hit; "b" is now least recently used
    cache.get("c", loader("c"))  # evicts "b"
    assert "a" in cache
    assert "c" in cache
    assert "b" not in cache
    cache.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"]
    assert cache.loads == 4


def test_heartbeat_thread_beats_until_stopped(tmp_path: Path) -> None:
    from service.store.sqlite import SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    with runtime.heartbeat(store, "w1", 0.05, pid=1):
        first = store.workers()[0].seen_at
        time.sleep(0.3)
        later = store.workers()[0].seen_at
    stopped = store.workers()[0].seen_at
    time.sleep(0.15)
    assert later > first
    assert store.workers()[0].seen_at == stopped
    assert store.workers()[0].info == {"pid": 1}


def test_device_selection(svc: runtime.WorkerServices) -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.select_device("auto") == expected
    assert runtime.select_device("cpu") == "cpu"
    assert runtime.current_device() == "cpu"
    if not torch.cuda.is_available():
        assert runtime.select_device("cuda:0") == "cpu"


def test_settings_are_read_from_the_environment(svc: runtime.WorkerServices) -> None:
    assert isinstance(svc.settings, Settings)
    assert svc.settings.progress_interval == 3600


def test_a_soft_time_limit_fails_the_job(svc: runtime.WorkerServices) -> None:
    from billiard.exceptions import SoftTimeLimitExceeded

    def slow(ctx: runtime.JobContext) -> dict[str, Any]:
        raise SoftTimeLimitExceeded()

    job_id = queued(svc.store)
    runtime.run_job(job_id, "w", slow)
    record = svc.store.get(job_id)
    assert record is not None
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "TimeLimitExceeded"


def test_a_hard_time_limit_reported_by_the_pool_fails_the_job(
    svc: runtime.WorkerServices,
) -> None:
    from celery.exceptions import TimeLimitExceeded

    from worker.tasks import JobTask, cam

    job_id = queued(svc.store)
    svc.store.start(job_id, "w")
    assert isinstance(cam, JobTask)
    cam.on_failure(TimeLimitExceeded(60), job_id, [job_id], {}, None)
    record = svc.store.get(job_id)
    assert record is not None
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "TimeLimitExceeded"


def broker_ids(settings: Settings) -> list[str]:
    """Task ids of the messages waiting in the embedded broker."""
    return sorted(
        json.loads(path.read_text())["headers"]["id"]
        for path in (settings.broker_dir / "queue").glob("*.msg")
    )


def test_worker_start_recovers_its_orphans_and_beats(svc: runtime.WorkerServices) -> None:
    """The embedded broker lost the messages of the jobs a killed worker had taken: the next
    start of that worker sends them again, or fails those whose worker died too often."""
    from types import SimpleNamespace

    from worker import app

    orphan, exhausted, other = (queued(svc.store, name) for name in ("orphan", "tired", "other"))
    svc.store.start(orphan, "embedded@host")
    for _ in range(svc.settings.max_attempts):
        svc.store.start(exhausted, "embedded@host")
    svc.store.start(other, "gpu1@host")
    svc.store.create(JobRecord(id="lost", kind="cam", spec={}, created_at=time.time() - 3600))
    fresh = queued(svc.store, "fresh")  # its gateway is sending it right now
    consumer = SimpleNamespace(
        hostname="embedded@host",
        task_consumer=SimpleNamespace(queues=[SimpleNamespace(name="gpu")]),
    )
    app._prepare(sender=SimpleNamespace(hostname="embedded@host"))
    app._on_ready(sender=consumer)
    try:
        beats = svc.store.workers()
        assert [b.name for b in beats] == ["embedded@host"]
        assert beats[0].info["queues"] == ["gpu"]
    finally:
        app._on_shutdown()
    assert broker_ids(svc.settings) == ["lost", "orphan"]
    requeued = svc.store.get(orphan)
    assert requeued is not None
    assert (requeued.status, requeued.attempts, requeued.worker) == ("queued", 1, None)
    failed = svc.store.get(exhausted)
    assert failed is not None
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "WorkerLostError"
    assert "died 3 times (limit 3 attempts)" in failed.error.message
    assert svc.store.get(other).status == "running"  # type: ignore[union-attr]
    assert svc.store.get(fresh).status == "queued"  # type: ignore[union-attr]


def test_a_job_whose_worker_keeps_dying_fails_instead_of_running_again(
    svc: runtime.WorkerServices,
) -> None:
    job_id = queued(svc.store)
    for _ in range(svc.settings.max_attempts):  # each run was killed with its worker
        svc.store.start(job_id, "w")
    called = []
    summary = runtime.run_job(job_id, "w", lambda ctx: called.append(1) or {})  # type: ignore[func-returns-value]
    assert summary["status"] == "failed"
    assert called == []
    record = svc.store.get(job_id)
    assert record is not None
    assert record.error is not None
    assert (record.status, record.error.type) == ("failed", "WorkerLostError")


def test_a_redelivered_job_runs_again_and_counts_the_attempt(svc: runtime.WorkerServices) -> None:
    job_id = queued(svc.store)
    svc.store.start(job_id, "w-killed")
    assert runtime.run_job(job_id, "w2", lambda ctx: {"ok": True})["status"] == "succeeded"
    record = svc.store.get(job_id)
    assert record is not None
    assert (record.status, record.attempts, record.worker) == ("succeeded", 2, "w2")


def test_a_periodic_thread_survives_a_failing_action() -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("store down for a moment")

    periodic = runtime.Periodic("test", 0.02, flaky)
    periodic.start()
    deadline = time.monotonic() + 10
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    periodic.stop()
    assert len(calls) >= 4


def test_a_scaled_out_worker_leaves_running_jobs_to_redelivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_prefix: str
) -> None:
    from types import SimpleNamespace

    from worker import app

    monkeypatch.setenv("CAMRES_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CAMRES_BROKER_URL", redis_url)
    monkeypatch.setenv("CAMRES_REDIS_PREFIX", redis_prefix)
    get_settings.cache_clear()
    runtime.services.cache_clear()
    try:
        store = runtime.services().store
        job_id = queued(store)
        store.start(job_id, "gpu1@host")
        app._prepare(sender=SimpleNamespace(hostname="gpu1@host"))
        assert store.get(job_id).status == "running"  # type: ignore[union-attr]
    finally:
        get_settings.cache_clear()
        runtime.services.cache_clear()
