"""Sweeps split across workers (worker/sweep_fanout.py): the split and merge, the parts run
in-process on the real core (tiny real checkpoint, real UC Merced images), and two real worker
processes on a real Redis sharing one sweep."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.exceptions import InputError
from core.sweep_report import merge_reports, read_rows_jsonl
from core.sweep_spec import SweepConfig, SweepReport
from service.app import create_app
from service.queue import make_celery
from service.settings import Settings
from service.store import JobProgress, open_store
from service.store.sqlite import SQLiteJobStore
from tests.service.support import (
    TINY_CLASSES,
    Api,
    dataset_zip,
    log_tail,
    start_process,
    stop_process,
    wait_for,
    worker_command,
)
from tests.worker.test_tasks import finished, submit
from worker import runtime, sweep_fanout, tasks

LOCATIONS = ["D3", "D4"]
#: Two locations, two fractions, one trial: four cells, split three ways below (D3's fractions
#: in two ranges, D4 whole), so both shard kinds are exercised.
SWEEP = {"locations": LOCATIONS, "fractions": [0.25, 0.5], "trials": 1, "batch_size": 4}


# --- split -----------------------------------------------------------------------------------
def cells(config: SweepConfig) -> list[tuple[str, float, int]]:
    return [
        (loc, f, t)
        for loc in config.locations
        for f in config.fractions
        for t in range(config.trials)
    ]


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 9, 100])
def test_split_covers_every_cell_once(parts: int) -> None:
    config = SweepConfig(
        locations=["D1", "D2", "D3", "D4"], fractions=[0.1, 0.2, 0.3], trials=2, retrain_at=[0.2]
    )
    split = config.split(parts)
    assert len(split) == min(parts, 12)
    assert sorted(c for part in split for c in cells(part)) == sorted(cells(config))
    assert sum(part.units for part in split) == config.units
    for part in split:
        assert part.retrain_at == [f for f in part.fractions if f in config.retrain_at]
        assert part.model_dump(exclude={"locations", "fractions", "retrain_at"}) == (
            config.model_dump(exclude={"locations", "fractions", "retrain_at"})
        )
    if parts <= 4:  # locations are the shard: every part has all fractions
        assert all(part.fractions == config.fractions for part in split)
    else:
        assert all(len(part.locations) == 1 for part in split)


def test_a_part_must_be_a_subset_of_the_sweep() -> None:
    config = SweepConfig(locations=["D4"], fractions=[0.5])
    with pytest.raises(InputError) as caught:
        config.subset(["D1"], [0.5])
    assert caught.value.field == "config"
    with pytest.raises(InputError):
        config.split(0)


# --- when to fan out -----------------------------------------------------------------------------
def test_part_count_follows_live_workers_and_the_setting(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    redis: dict[str, Any] = {"broker_url": "redis://127.0.0.1:1/0", "data_dir": tmp_path}
    store.heartbeat("a@h", {"queues": ["gpu"]})
    assert sweep_fanout.part_count(Settings(**redis), store) == 1  # one worker: whole
    store.heartbeat("b@h", {"queues": ["cpu", "gpu"]})
    store.heartbeat("c@h", {"queues": ["cpu"]})  # not on the sweep's queue
    assert sweep_fanout.part_count(Settings(**redis), store) == 2
    assert sweep_fanout.part_count(Settings(**redis, sweep_fanout=5), store) == 5
    assert sweep_fanout.part_count(Settings(**redis, sweep_fanout=1), store) == 1
    assert sweep_fanout.part_count(Settings(data_dir=tmp_path), store) == 1  # embedded
    time.sleep(0.1)
    assert sweep_fanout.part_count(Settings(**redis, heartbeat_max_age=0.05), store) == 1


# --- parts in-process --------------------------------------------------------------------------


def sweep_spec(model: str, dataset: str, **config: Any) -> dict[str, Any]:
    return {"kind": "sweep", "model": model, "dataset": dataset, "config": {**SWEEP, **config}}


def split_job(
    svc: runtime.WorkerServices, spec: dict[str, Any], parts: int
) -> tuple[str, list[str]]:
    """What the dispatcher does, minus sending: the job started and its parts declared."""
    job_id = submit(svc, spec)
    assert svc.store.start(job_id, "dispatcher") is not None
    plan = sweep_fanout.plan_parts(SweepConfig.model_validate(spec["config"]).split(parts))
    assert svc.store.declare_parts(job_id, plan) == plan
    return job_id, list(plan)


def run_part(job_id: str, part: str) -> str:
    status: str = tasks.sweep_part.apply(args=[job_id, part]).get()["status"]
    return status


def report_of(folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((folder / "sweep.json").read_text())
    report.pop("seconds")
    return report


def test_merged_parts_equal_the_whole_sweep(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
) -> None:
    spec = sweep_spec(model_id, dataset_id)
    whole = submit(svc, spec)
    assert tasks.sweep.apply(args=[whole]).get()["status"] == "succeeded"
    job_id, parts = split_job(svc, spec, 3)
    assert parts == ["p0", "p1", "p2"]

    assert run_part(job_id, "p0") == "done"
    running = finished(svc, job_id)
    assert running.status == "running"
    # p0 (D3 at 25 %) is a quarter of the cells; the others have not reported yet.
    assert running.progress.fraction == 0.25
    assert running.progress.metrics["parts_done"] == 1
    artifacts = svc.settings.artifacts_dir / job_id
    rows = read_rows_jsonl(artifacts / sweep_fanout.part_jsonl("p0"))
    assert [(r.location, r.fraction) for r in rows] == [("D3", 0.25)]
    assert [run_part(job_id, p) for p in ("p2", "p1")] == ["done", "merged"]

    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.progress.fraction == 1.0
    assert record.result is not None
    assert [(p["part"], p["cells"]) for p in record.result["parts"]] == [
        ("p0", 1),
        ("p1", 1),
        ("p2", 2),
    ]
    reference = svc.settings.artifacts_dir / whole
    assert report_of(artifacts) == report_of(reference)
    for name in ("sweep_cells.csv", "sweep_summary.csv"):
        assert (artifacts / name).read_text() == (reference / name).read_text(), name
    assert read_rows_jsonl(artifacts / tasks.CELLS_JSONL) == sorted(
        read_rows_jsonl(reference / tasks.CELLS_JSONL),
        key=lambda r: (LOCATIONS.index(r.location), r.fraction, r.trial),
    )
    for name in record.result["artifacts"].values():
        assert (artifacts / name).is_file(), name
    # Merging checks that the parts cover the sweep once.
    one = SweepReport.model_validate_json((reference / "sweep.json").read_text())
    config = SweepConfig.model_validate(SWEEP)
    for bad in ([one, one], [one.model_copy(update={"rows": one.rows[1:]})]):
        with pytest.raises(InputError) as caught:
            merge_reports(config, bad)
        assert caught.value.field == "parts"


def test_a_failing_part_fails_the_job_and_the_others_do_not_run(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
) -> None:
    spec = sweep_spec(model_id, dataset_id, locations=["D4", "no_such_layer.*"])
    job_id, _ = split_job(svc, spec, 2)
    assert run_part(job_id, "p1") == "failed"
    record = finished(svc, job_id)
    assert record.status == "failed"
    assert record.error is not None
    assert (record.error.type, record.error.field) == ("DamageSpecError", "locations")
    assert run_part(job_id, "p0") == "skipped"
    assert not (svc.settings.artifacts_dir / job_id / sweep_fanout.part_report("p0")).exists()


def test_a_cancelled_split_sweep_stops_every_part_between_cells(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id, _ = split_job(svc, sweep_spec(model_id, dataset_id), 2)
    monkeypatch.setattr(svc.settings, "progress_interval", 0.0)
    real_set = svc.store.set_part_progress

    def cancel_during_first_cell(job: str, part: str, progress: JobProgress) -> None:
        real_set(job, part, progress)
        if progress.stage == "sweep" and not svc.store.cancel_requested(job):
            svc.store.request_cancel(job)  # a client's POST /v1/jobs/{id}/cancel

    monkeypatch.setattr(svc.store, "set_part_progress", cancel_during_first_cell)
    assert run_part(job_id, "p0") == "cancelled"
    assert run_part(job_id, "p1") == "skipped"
    record = finished(svc, job_id)
    assert (record.status, record.result) == ("cancelled", None)
    artifacts = svc.settings.artifacts_dir / job_id
    rows = read_rows_jsonl(artifacts / sweep_fanout.part_jsonl("p0"))
    assert [(r.location, r.fraction) for r in rows] == [("D3", 0.25)]
    assert not (artifacts / "sweep.json").exists()


def test_a_part_that_keeps_losing_its_worker_fails_the_job(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
) -> None:
    job_id, _ = split_job(svc, sweep_spec(model_id, dataset_id), 2)
    for _ in range(svc.settings.max_attempts):  # runs whose worker died mid-part
        svc.store.start_part(job_id, "p0", "gone@host")
    assert run_part(job_id, "p0") == "failed"
    record = finished(svc, job_id)
    assert record.error is not None
    assert record.error.type == "WorkerLostError"


def test_a_dispatcher_delivered_again_sends_only_the_parts_not_started(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its worker died after declaring the plan; now a single worker is live (embedded: one).
    The sweep must not run whole beside the parts, and the parts running or done must not be
    sent a second time."""
    job_id, _ = split_job(svc, sweep_spec(model_id, dataset_id), 3)
    assert svc.store.start_part(job_id, "p0", "a@host") is not None  # running
    assert svc.store.start_part(job_id, "p1", "b@host") is not None
    assert svc.store.finish_part(job_id, "p1") is not None  # done
    app = make_celery(svc.settings)  # parts go to this test's embedded broker
    monkeypatch.setattr(sweep_fanout, "celery_app", app)
    try:
        summary = tasks.sweep.apply(args=[job_id]).get()
    finally:
        app.close()

    assert summary == {"job": job_id, "status": "dispatched", "parts": ["p2"]}
    sent = [json.loads(f.read_text()) for f in (svc.settings.broker_dir / "queue").iterdir()]
    assert [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in sent] == [
        (sweep_fanout.PART_TASK, repr((job_id, "p2")))
    ]
    record = finished(svc, job_id)
    assert (record.status, record.attempts) == ("running", 1)
    assert not (svc.settings.artifacts_dir / job_id / tasks.CELLS_JSONL).exists()


# --- two real workers on a real Redis ----------------------------------------------------------
@pytest.mark.integration
def test_a_sweep_fans_out_across_two_real_workers(
    tmp_path: Path, redis_url: str, redis_prefix: str, tiny_checkpoint: Path, ucm_dir: Path
) -> None:
    env: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "broker_url": redis_url,
        "redis_prefix": redis_prefix,
        "heartbeat_interval": 0.5,
        "heartbeat_max_age": 3.0,
    }
    settings = Settings(**env)
    store = open_store(settings)
    names = [f"{redis_prefix}-{n}" for n in ("a", "b")]
    logs = [tmp_path / f"worker-{n}.log" for n in ("a", "b")]
    workers = [
        start_process(worker_command(f"{name}@%h"), log, **env)
        for name, log in zip(names, logs, strict=True)
    ]

    def live() -> list[str]:
        return sweep_fanout.live_workers(settings, store)

    try:
        with TestClient(create_app(settings)) as client:
            api = Api(client, logs[0])
            wait_for(lambda: len(live()) == 2, 120, f"two workers\n{log_tail(logs[1])}", 0.25)
            model = api.upload_model(tiny_checkpoint)
            dataset = api.upload_dataset(dataset_zip(ucm_dir, TINY_CLASSES, 2))
            spec = sweep_spec(model, dataset)

            fanned = api.finished(api.submit(spec))
            assert fanned["status"] == "succeeded", f"{fanned}\n{log_tail(logs[1])}"
            parts = fanned["result"]["parts"]
            assert {p["worker"].split("@")[0] for p in parts} == set(names)
            assert fanned["progress"]["fraction"] == 1.0

            # The same sweep on one worker: b stops, and once its heartbeat is stale the
            # sweep runs whole on a.
            stop_process(workers[1])
            wait_for(lambda: len(live()) == 1, 30, "worker b to be seen gone")
            whole = api.finished(api.submit(spec))
            assert whole["status"] == "succeeded", whole
            assert whole["result"]["parts"] is None

            def report(job: dict[str, Any]) -> dict[str, Any]:
                url = f"/v1/jobs/{job['id']}/artifacts/sweep.json"
                document: dict[str, Any] = client.get(url).json()
                document.pop("seconds")
                return document

            assert report(fanned) == report(whole)
            assert fanned["result"]["summary"] == whole["result"]["summary"]
        assert workers[0].poll() is None, log_tail(logs[0])
    finally:
        for worker in workers:
            stop_process(worker)
        store.close()
