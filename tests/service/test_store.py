"""The job store contract, run against both backends: SQLite (embedded) and a real Redis."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.store import (
    ANY_OWNER,
    InvalidCursorError,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobProgress,
    JobRecord,
    JobStore,
    PartState,
    StoreError,
    TooManyJobsError,
    open_store,
)
from service.store.redis import RedisJobStore
from service.store.sqlite import SQLiteJobStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        backend: JobStore = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisJobStore.from_url(url, prefix=request.getfixturevalue("redis_prefix"))
    yield backend
    backend.close()


def job(job_id: str, kind: str = "cam", created_at: float = 1000.0) -> JobRecord:
    return JobRecord(id=job_id, kind=kind, spec={"kind": kind, "model": "m"}, created_at=created_at)


def test_create_get_round_trip(store: JobStore) -> None:
    record = job("a")
    store.create(record)
    assert store.get("a") == record
    assert store.get("missing") is None


def test_create_refuses_an_existing_id(store: JobStore) -> None:
    store.create(job("a"))
    with pytest.raises(JobConflictError):
        store.create(job("a", kind="train"))
    stored = store.get("a")
    assert stored is not None
    assert stored.kind == "cam"


def test_lifecycle_to_success(store: JobStore) -> None:
    store.create(job("a"))
    started = store.start("a", "w1")
    assert started is not None
    assert started.status == "running"
    assert started.worker == "w1"
    assert started.started_at is not None
    store.set_progress("a", JobProgress(fraction=0.5, stage="cam", message="1/2 images"))
    running = store.get("a")
    assert running is not None
    assert running.progress.fraction == 0.5
    assert store.finish("a", "succeeded", result={"images": [1, 2]})
    done = store.get("a")
    assert done is not None
    assert (done.status, done.result, done.error) == ("succeeded", {"images": [1, 2]}, None)
    assert done.finished_at is not None
    assert done.finished
    # A finished job takes no more progress, and cannot finish twice.
    store.set_progress("a", JobProgress(fraction=0.9))
    assert not store.finish("a", "failed", error=JobError(type="X", message="late"))
    again = store.get("a")
    assert again is not None
    assert again.status == "succeeded"
    assert again.progress.fraction == 0.5


def test_failure_keeps_type_message_and_field(store: JobStore) -> None:
    store.create(job("a"))
    store.start("a", "w1")
    error = JobError(type="DamageSpecError", message="no layer matches", field="targets")
    assert store.finish("a", "failed", error=error)
    failed = store.get("a")
    assert failed is not None
    assert failed.status == "failed"
    assert failed.error == error


def test_progress_is_ignored_before_the_job_runs(store: JobStore) -> None:
    store.create(job("a"))
    store.set_progress("a", JobProgress(fraction=0.7))
    queued = store.get("a")
    assert queued is not None
    assert queued.progress.fraction == 0.0


def test_cancel_a_queued_job_then_start_refuses(store: JobStore) -> None:
    store.create(job("a"))
    cancelled = store.request_cancel("a")
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert store.cancel_requested("a")
    assert store.start("a", "w1") is None
    with pytest.raises(JobConflictError):
        store.request_cancel("a")


def test_cancel_a_running_job_sets_the_flag(store: JobStore) -> None:
    store.create(job("a"))
    store.start("a", "w1")
    assert not store.cancel_requested("a")
    flagged = store.request_cancel("a")
    assert flagged.status == "running"
    assert flagged.cancel_requested
    assert store.cancel_requested("a")
    # A redelivered task must not restart a job that was asked to stop.
    assert store.start("a", "w2") is None
    assert store.finish("a", "cancelled")
    final = store.get("a")
    assert final is not None
    assert final.status == "cancelled"


def test_cancel_unknown_and_finished_jobs(store: JobStore) -> None:
    with pytest.raises(JobNotFoundError):
        store.request_cancel("nope")
    store.create(job("a"))
    store.start("a", "w1")
    store.finish("a", "succeeded", result={})
    with pytest.raises(JobConflictError):
        store.request_cancel("a")


def test_a_redelivered_running_job_may_start_again(store: JobStore) -> None:
    store.create(job("a"))
    store.start("a", "w1")
    restarted = store.start("a", "w2")
    assert restarted is not None
    assert restarted.worker == "w2"


def test_list_newest_first_with_cursor_and_filters(store: JobStore) -> None:
    # Equal creation times are ordered by id, so pages never skip or repeat a job.
    times = {"j1": 1.0, "j2": 2.0, "j3": 2.0, "j4": 3.0, "j5": 4.0}
    for job_id, created in times.items():
        store.create(job(job_id, kind="train" if job_id == "j3" else "cam", created_at=created))
    store.start("j2", "w")
    seen: list[str] = []
    page = store.list_jobs(limit=2)
    while True:
        seen += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        page = store.list_jobs(limit=2, cursor=page.next_cursor)
    assert seen == ["j5", "j4", "j3", "j2", "j1"]
    assert [r.id for r in store.list_jobs(kind="train").items] == ["j3"]
    assert [r.id for r in store.list_jobs(status="running").items] == ["j2"]
    assert [r.id for r in store.list_jobs(status="queued", kind="cam").items] == ["j5", "j4", "j1"]
    assert store.list_jobs(limit=5).next_cursor is None


def test_list_rejects_a_forged_cursor(store: JobStore) -> None:
    with pytest.raises(InvalidCursorError):
        store.list_jobs(cursor="not-a-cursor")


def test_counts_by_kind_and_status(store: JobStore) -> None:
    for job_id in ("a", "b", "c"):
        store.create(job(job_id))
    store.create(job("t", kind="train"))
    store.start("a", "w")
    store.finish("a", "succeeded", result={})
    store.request_cancel("b")
    assert store.counts() == {
        ("cam", "succeeded"): 1,
        ("cam", "cancelled"): 1,
        ("cam", "queued"): 1,
        ("train", "queued"): 1,
    }


def test_fail_running_only_touches_that_workers_running_jobs(store: JobStore) -> None:
    for job_id in ("a", "b", "c"):
        store.create(job(job_id))
    store.start("a", "w1")
    store.start("b", "w2")
    error = JobError(type="WorkerLostError", message="gone")
    assert store.fail_running(error, worker="w1") == ["a"]
    statuses = {j: store.get(j).status for j in "abc"}  # type: ignore[union-attr]
    assert statuses == {"a": "failed", "b": "running", "c": "queued"}


def test_heartbeats(store: JobStore) -> None:
    assert store.workers() == []
    store.heartbeat("w1", {"pid": 1})
    store.heartbeat("w2", {"pid": 2})
    store.heartbeat("w1", {"pid": 3})
    beats = store.workers()
    assert [b.name for b in beats] == ["w1", "w2"]
    assert beats[0].info == {"pid": 3}
    assert beats[0].age() < 60


def test_concurrent_finish_and_cancel_leave_one_final_status(store: JobStore) -> None:
    """A cancel racing the worker's finish: exactly one wins, the record stays consistent."""
    for i in range(20):
        job_id = f"race{i}"
        store.create(job(job_id))
        store.start(job_id, "w")
        outcomes: list[str] = []

        def finish(job_id: str = job_id, outcomes: list[str] = outcomes) -> None:
            if store.finish(job_id, "succeeded", result={}):
                outcomes.append("finished")

        def cancel(job_id: str = job_id, outcomes: list[str] = outcomes) -> None:
            try:
                store.request_cancel(job_id)
                outcomes.append("flagged")
            except JobConflictError:
                outcomes.append("too-late")

        threads = [threading.Thread(target=finish), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        record = store.get(job_id)
        assert record is not None
        assert record.status == "succeeded"
        assert "finished" in outcomes


def test_store_survives_fork(store: JobStore) -> None:
    """A store created before a prefork pool forks keeps working in the child."""
    store.create(job("parent"))
    pid = os.fork()
    if pid == 0:  # child: exit code tells the parent whether the store worked
        try:
            store.create(job("child"))
            os._exit(0 if store.get("parent") is not None else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("child") is not None


def test_open_store_follows_the_settings(tmp_path: Path, redis_url: str) -> None:
    embedded = open_store(Settings(data_dir=tmp_path, broker_url=None))
    assert isinstance(embedded, SQLiteJobStore)
    assert embedded.path == (tmp_path / "camres.sqlite3").resolve()
    scaled = open_store(Settings(data_dir=tmp_path, broker_url=redis_url))
    assert isinstance(scaled, RedisJobStore)
    with pytest.raises(StoreError):
        open_store(Settings(data_dir=tmp_path, store_url="postgres://x"))


def test_unreachable_redis_is_a_store_error() -> None:
    store = RedisJobStore.from_url("redis://127.0.0.1:1/0", prefix="camres-test-unreachable")
    with pytest.raises(StoreError):
        store.ping()
    with pytest.raises(StoreError):
        store.get("a")


def test_owners_filter_listings(store: JobStore) -> None:
    for job_id, owner in (("a", "alice"), ("b", "bob"), ("c", None), ("d", "alice")):
        store.create(job(job_id, created_at=ord(job_id)).model_copy(update={"owner": owner}))
    assert [r.id for r in store.list_jobs(owner="alice").items] == ["d", "a"]
    assert [r.id for r in store.list_jobs(owner=None).items] == ["c"]
    assert [r.id for r in store.list_jobs(owner=ANY_OWNER).items] == ["d", "c", "b", "a"]
    page = store.list_jobs(owner="alice", limit=1)
    assert [r.id for r in page.items] == ["d"]
    assert [r.id for r in store.list_jobs(owner="alice", cursor=page.next_cursor).items] == ["a"]
    stored = store.get("b")
    assert stored is not None
    assert stored.owner == "bob"


def test_the_active_job_limit_is_per_owner_and_frees_up(store: JobStore) -> None:
    def owned(job_id: str, owner: str) -> JobRecord:
        return job(job_id).model_copy(update={"owner": owner})

    store.create(owned("a1", "alice"), max_active=2)
    store.create(owned("a2", "alice"), max_active=2)
    with pytest.raises(TooManyJobsError) as refused:
        store.create(owned("a3", "alice"), max_active=2)
    assert refused.value.limit == 2
    assert store.get("a3") is None
    store.create(owned("b1", "bob"), max_active=2)  # bob has his own allowance
    store.start("a1", "w")  # running still counts
    with pytest.raises(TooManyJobsError):
        store.create(owned("a3", "alice"), max_active=2)
    store.finish("a1", "succeeded", result={})
    store.create(owned("a3", "alice"), max_active=2)
    store.request_cancel("a2")
    store.create(owned("a4", "alice"), max_active=2)
    assert store.counts()[("cam", "queued")] == 3


def test_concurrent_submissions_never_exceed_the_limit(store: JobStore) -> None:
    accepted: list[str] = []
    refused: list[str] = []

    def submit(i: int) -> None:
        try:
            store.create(job(f"j{i}").model_copy(update={"owner": "o"}), max_active=5)
            accepted.append(f"j{i}")
        except TooManyJobsError:
            refused.append(f"j{i}")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(accepted), len(refused)) == (5, 15)
    assert len(store.list_jobs(owner="o").items) == 5


def test_attempts_are_counted_and_a_running_job_can_be_requeued(store: JobStore) -> None:
    store.create(job("a"))
    assert not store.requeue("a")  # only a running job goes back to the queue
    store.start("a", "w1")
    assert store.requeue("a")
    requeued = store.get("a")
    assert requeued is not None
    assert (requeued.status, requeued.attempts, requeued.worker) == ("queued", 1, None)
    again = store.start("a", "w2")
    assert again is not None
    assert (again.status, again.attempts) == ("running", 2)
    assert store.counts() == {("cam", "running"): 1}


def test_expired_jobs_are_deleted_and_still_counted(store: JobStore) -> None:
    for job_id in ("old", "new", "open"):
        store.create(job(job_id))
    store.start("old", "w")
    store.finish("old", "succeeded", result={})
    time.sleep(0.05)
    cutoff = time.time()
    time.sleep(0.05)
    store.request_cancel("new")
    assert store.expired(cutoff) == ["old"]
    assert store.expired(time.time() + 1) == ["old", "new"]
    assert not store.delete("open")  # an unfinished job is never deleted
    assert store.delete("old")
    assert not store.delete("old")
    assert store.get("old") is None
    assert [r.id for r in store.list_jobs().items] == ["open", "new"]
    assert store.expired(time.time() + 1) == ["new"]
    # Finished counts feed Prometheus counters: a deletion must not lower them.
    assert store.counts() == {
        ("cam", "succeeded"): 1,
        ("cam", "cancelled"): 1,
        ("cam", "queued"): 1,
    }


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, "
            "created_at REAL NOT NULL, started_at REAL, finished_at REAL, spec TEXT NOT NULL, "
            "progress TEXT NOT NULL, result TEXT, error TEXT, "
            "cancel_requested INTEGER NOT NULL DEFAULT 0, worker TEXT);"
            "INSERT INTO jobs VALUES ('j', 'cam', 'queued', 1.0, NULL, NULL, '{}', '{}', NULL, "
            "NULL, 0, NULL);"
        )
    store = SQLiteJobStore(path)
    record = store.get("j")
    assert record is not None
    assert (record.owner, record.attempts) == (None, 0)
    started = store.start("j", "w")
    assert started is not None
    assert started.attempts == 1


# --- parts of a job run by several workers (a fanned-out sweep) ---------------------------------
def two_parts() -> dict[str, PartState]:
    return {"p0": PartState(spec={"index": 0}, weight=1.0), "p1": PartState(weight=3.0)}


def test_parts_are_declared_once_on_a_running_job(store: JobStore) -> None:
    store.create(job("a"))
    assert store.declare_parts("a", two_parts()) is None  # queued: nothing to split yet
    store.start("a", "dispatcher")
    assert store.declare_parts("a", two_parts()) == two_parts()
    # A redelivered dispatcher finds the plan it sent, not a new one.
    assert store.declare_parts("a", {"q": PartState()}) == two_parts()
    assert store.parts("a") == two_parts()
    assert store.parts("unknown") == {}


def test_part_progress_is_combined_by_weight_and_never_overwritten(store: JobStore) -> None:
    store.create(job("a"))
    store.start("a", "dispatcher")
    store.declare_parts("a", two_parts())
    store.set_part_progress(
        "a", "p0", JobProgress(fraction=0.5, stage="sweep", metrics={"rows": 1})
    )
    store.set_part_progress("a", "p1", JobProgress(fraction=1 / 3, stage="load", message="p1"))
    record = store.get("a")
    assert record is not None
    assert record.progress.fraction == pytest.approx((0.5 * 1 + 1 / 3 * 3) / 4)
    assert (record.progress.stage, record.progress.message) == ("load", "p1")
    assert record.progress.metrics == {"parts": 2, "parts_done": 0}
    parts = store.parts("a")
    assert (parts["p0"].fraction, parts["p0"].metrics) == (0.5, {"rows": 1})
    store.set_part_progress("a", "nope", JobProgress(fraction=1.0))  # unknown part: ignored
    assert store.get("a").progress.fraction == record.progress.fraction  # type: ignore[union-attr]


def test_parts_are_started_counted_and_finished_idempotently(store: JobStore) -> None:
    store.create(job("a"))
    store.start("a", "dispatcher")
    store.declare_parts("a", two_parts())
    first = store.start_part("a", "p0", "w1")
    again = store.start_part("a", "p0", "w2")  # redelivered after w1 died
    assert first is not None
    assert again is not None
    assert (first.attempts, again.attempts, again.worker) == (1, 2, "w2")
    assert store.start_part("a", "nope", "w1") is None
    after = store.finish_part("a", "p0")
    assert after is not None
    assert [after["p0"].done, after["p1"].done] == [True, False]
    assert store.finish_part("a", "p0") == after  # idempotent
    done = store.finish_part("a", "p1")
    assert done is not None
    assert all(p.done for p in done.values())
    record = store.get("a")
    assert record is not None
    assert record.progress.fraction == 1.0
    assert record.progress.metrics["parts_done"] == 2
    # A finished job's parts are frozen, readable (a batch leader delivered again reads its
    # members: worker/batch_members.py), and leave with the job.
    assert store.finish("a", "succeeded", result={})
    assert store.parts("a") == done
    assert store.start_part("a", "p0", "w3") is None
    assert store.finish_part("a", "p1") is None
    assert store.delete("a")
    assert store.parts("a") == {}


def test_concurrent_part_updates_lose_nothing(store: JobStore) -> None:
    """Parts on different workers write progress at the same time; every write lands in its own
    entry and the combined fraction is consistent with them."""
    names = [f"p{i}" for i in range(4)]
    store.create(job("a"))
    store.start("a", "dispatcher")
    store.declare_parts("a", {name: PartState() for name in names})

    def report(name: str) -> None:
        for step in range(1, 21):
            store.set_part_progress("a", name, JobProgress(fraction=step / 20))

    threads = [threading.Thread(target=report, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(state.fraction == 1.0 for state in store.parts("a").values())
    record = store.get("a")
    assert record is not None
    assert record.progress.fraction == 1.0


def test_statuses_reads_many_jobs_and_leaves_out_missing_ones(store: JobStore) -> None:
    for job_id in ("a", "b", "c"):
        store.create(job(job_id))
    store.start("b", "w1")
    store.finish("c", "cancelled")
    assert store.statuses(["a", "b", "c", "gone"]) == {
        "a": "queued",
        "b": "running",
        "c": "cancelled",
    }
    assert store.statuses([]) == {}
