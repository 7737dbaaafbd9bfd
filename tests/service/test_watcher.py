"""Long polling's watcher (service.watcher) on a real SQLite job store: it wakes a waiting
request when its job ends or vanishes, times out otherwise, survives store errors, and leaves
nothing behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from service.store import JobRecord, JobStore, StoreError
from service.store.sqlite import SQLiteJobStore
from service.watcher import JobWatcher

TICK = 0.005


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    backend = SQLiteJobStore(tmp_path / "jobs.db")
    backend.create(JobRecord(id="j", kind="cam", spec={"kind": "cam"}))
    yield backend
    backend.close()


async def finish_later(store: JobStore, delay: float) -> None:
    await asyncio.sleep(delay)
    store.finish("j", "succeeded", result={})


def test_a_waiter_wakes_when_its_job_ends(store: JobStore) -> None:
    watcher = JobWatcher(store, tick=TICK)

    async def scenario() -> tuple[bool, float]:
        started = time.monotonic()
        ended, _ = await asyncio.gather(
            watcher.wait_finished("j", timeout=5), finish_later(store, 0.1)
        )
        return ended, time.monotonic() - started

    ended, seconds = asyncio.run(scenario())
    assert ended
    assert 0.1 <= seconds < 1.0
    assert watcher.waiting == 0


def test_a_waiter_times_out_on_a_job_that_keeps_running(store: JobStore) -> None:
    watcher = JobWatcher(store, tick=TICK)
    assert asyncio.run(watcher.wait_finished("j", timeout=0.1)) is False
    assert watcher.waiting == 0


def test_a_job_deleted_while_waited_for_wakes_its_waiters(store: JobStore) -> None:
    watcher = JobWatcher(store, tick=TICK)

    async def delete_later() -> bool:
        await asyncio.sleep(0.05)
        assert watcher.waiting == 3
        store.finish("j", "cancelled")
        return store.delete("j")  # retention removed it before a tick saw it end

    async def scenario() -> list[bool]:
        waits = [watcher.wait_finished("j", timeout=5) for _ in range(3)]
        return list(await asyncio.gather(*waits, delete_later()))

    assert asyncio.run(scenario()) == [True, True, True, True]


class _Flaky(SQLiteJobStore):
    """Fails its first status reads, as a store does while it restarts."""

    failures = 2

    def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        if self.failures:
            self.failures -= 1
            raise StoreError("store restarting")
        return super().statuses(job_ids)


def test_the_watcher_outlives_store_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.watcher.ERROR_BACKOFF_S", TICK)
    store = _Flaky(tmp_path / "jobs.db")
    store.create(JobRecord(id="j", kind="cam", spec={"kind": "cam"}))
    store.finish("j", "failed")
    watcher = JobWatcher(store, tick=TICK)
    assert asyncio.run(watcher.wait_finished("j", timeout=5)) is True
    assert store.failures == 0


def test_close_stops_the_task(store: JobStore) -> None:
    watcher = JobWatcher(store, tick=TICK)

    async def scenario() -> list[asyncio.Task[object]]:
        waiting = asyncio.ensure_future(watcher.wait_finished("j", timeout=5))
        await asyncio.sleep(0.02)
        assert watcher.waiting == 1
        await watcher.close()
        waiting.cancel()
        await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t.get_name() == "camres-job-watcher"]

    assert asyncio.run(scenario()) == []


def test_each_event_loop_gets_its_own_watch(store: JobStore) -> None:
    watcher = JobWatcher(store, tick=TICK)
    # A gateway under a test client may serve from a new loop each time: a task left on the
    # old loop must not be what the new loop's waiters depend on.
    assert asyncio.run(watcher.wait_finished("j", timeout=0.05)) is False
    store.finish("j", "succeeded", result={})
    assert asyncio.run(watcher.wait_finished("j", timeout=5)) is True


def test_tick_must_be_positive(store: JobStore) -> None:
    with pytest.raises(ValueError, match="tick"):
        JobWatcher(store, tick=0)
