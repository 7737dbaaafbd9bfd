"""The transfer and sweep tasks, run in-process (``Task.apply``) on the real core: tiny real
checkpoints, real UC Merced and AID images, real artifacts on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from core.checkpoint import load_model
from core.sweep_report import read_rows_jsonl
from service.store import JobProgress
from tests.service.support import TINY_CLASSES, make_tiny_checkpoint
from tests.worker.conftest import stored_model
from tests.worker.test_tasks import finished, submit
from worker import runtime, tasks

#: The sweep of these tests: one location, two fractions, one trial.
SWEEP = {"locations": ["D4"], "fractions": [0.25, 0.5], "trials": 1, "batch_size": 4}


def progress_log(svc: runtime.WorkerServices, monkeypatch: pytest.MonkeyPatch) -> list[JobProgress]:
    """Every progress the worker writes (none throttled away)."""
    monkeypatch.setattr(svc.settings, "progress_interval", 0.0)
    written: list[JobProgress] = []
    real_set = svc.store.set_progress

    def spy(job_id: str, progress: JobProgress) -> None:
        written.append(progress)
        real_set(job_id, progress)

    monkeypatch.setattr(svc.store, "set_progress", spy)
    return written


def assert_cached_model_is_intact(model_id: str, checkpoint: Path) -> None:
    cached, _ = runtime.model_cache().get(model_id, lambda: pytest.fail("not cached"))
    fresh, _ = load_model(checkpoint)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor), name


# --- sweep ------------------------------------------------------------------------------------
def test_sweep_task_reports_every_cell_and_leaves_the_model_intact(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written = progress_log(svc, monkeypatch)
    job_id = submit(
        svc, {"kind": "sweep", "model": model_id, "dataset": dataset_id, "config": SWEEP}
    )
    assert tasks.sweep.apply(args=[job_id]).get()["status"] == "succeeded"
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    result = record.result
    assert result is not None
    assert (result["arch"], result["classes"], result["images"]) == ("resnet18", TINY_CLASSES, 6)
    assert result["cells"] == 2
    assert [(r["location"], r["fraction"]) for r in result["summary"]] == [
        ("D4", 0.25),
        ("D4", 0.5),
    ]
    # Progress per cell, with the rows finished so far.
    cells = [p.metrics for p in written if p.stage == "sweep"]
    assert {(m["location"], m["fraction"], m["trial"]) for m in cells} == {
        ("D4", 0.25, 0),
        ("D4", 0.5, 0),
    }
    assert [m["rows"] for m in cells] == sorted(m["rows"] for m in cells)
    assert record.progress.fraction == 1.0
    # The artifacts: the partial rows file holds every row of the report.
    artifacts = svc.settings.artifacts_dir / job_id
    for name in result["artifacts"].values():
        assert (artifacts / name).is_file(), name
    report = json.loads((artifacts / result["artifacts"]["json"]).read_text())
    rows = read_rows_jsonl(artifacts / tasks.CELLS_JSONL)
    assert [r.model_dump(mode="json") for r in rows] == report["rows"]
    assert all(r.damaged_weights > 0 for r in rows)
    assert report["provenance"] == {"model": model_id, "dataset": dataset_id}
    assert_cached_model_is_intact(model_id, tiny_checkpoint)


def test_a_cancelled_sweep_stops_between_cells_and_keeps_its_rows(
    svc: runtime.WorkerServices,
    model_id: str,
    dataset_id: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = submit(
        svc, {"kind": "sweep", "model": model_id, "dataset": dataset_id, "config": SWEEP}
    )
    real_set = svc.store.set_progress

    def cancel_during_first_cell(job: str, progress: JobProgress) -> None:
        real_set(job, progress)
        if progress.stage == "sweep" and not svc.store.cancel_requested(job):
            svc.store.request_cancel(job)  # a client's POST /v1/jobs/{id}/cancel

    monkeypatch.setattr(svc.store, "set_progress", cancel_during_first_cell)
    assert tasks.sweep.apply(args=[job_id]).get()["status"] == "cancelled"
    record = finished(svc, job_id)
    assert record.status == "cancelled"
    assert record.result is None
    # The first cell finished before the cancel was seen; the second never started.
    rows = read_rows_jsonl(svc.settings.artifacts_dir / job_id / tasks.CELLS_JSONL)
    assert [(r.location, r.fraction) for r in rows] == [("D4", 0.25)]
    assert not (svc.settings.artifacts_dir / job_id / "sweep.json").exists()
    assert_cached_model_is_intact(model_id, tiny_checkpoint)


def test_a_sweep_location_that_matches_nothing_fails_the_job(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str
) -> None:
    config = {**SWEEP, "locations": ["no_such_layer.*"]}
    job_id = submit(
        svc, {"kind": "sweep", "model": model_id, "dataset": dataset_id, "config": config}
    )
    tasks.sweep.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "failed"
    assert record.error is not None
    assert (record.error.type, record.error.field) == ("DamageSpecError", "locations")


# --- transfer ---------------------------------------------------------------------------------
#: A tiny UC Merced model: three classes AID shares, one (intersection) it has not.
UCM_CLASSES = ["agricultural", "airplane", "beach", "intersection"]
#: Its AID counterparts, plus AID's class UC Merced has not.
AID_CLASSES = ["Airport", "Beach", "Bridge", "Farmland"]


@pytest.fixture
def aid_dataset(svc: runtime.WorkerServices, aid_dir: Path, tmp_path: Path) -> str:
    """Four real AID-mini images of each of four classes."""
    folder = tmp_path / "shared" / "aid4"
    for cls in AID_CLASSES:
        (folder / cls).mkdir(parents=True)
        for path in sorted((aid_dir / cls).glob("*.jpg"))[:4]:
            shutil.copyfile(path, folder / cls / path.name)
    return svc.datasets.register(folder, "aid4", max_pixels=10**8).id


def transfer_spec(model: str, dataset: str, mapping_file: Path, **extra: Any) -> dict[str, Any]:
    mapping = json.loads(mapping_file.read_text())
    return {"kind": "transfer", "model": model, "dataset": dataset, "mapping": mapping, **extra}


def test_transfer_task_with_fine_tuning_stores_the_tuned_model(
    svc: runtime.WorkerServices, aid_dataset: str, class_mapping_file: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ucm4.safetensors"
    make_tiny_checkpoint(checkpoint, UCM_CLASSES)
    source = stored_model(svc, checkpoint)
    fine_tune = {
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.01,
        "val_fraction": 0.0,
        "test_fraction": 0.25,
        "device": "cpu",
        "amp": False,
    }
    spec = transfer_spec(source, aid_dataset, class_mapping_file, fine_tune=fine_tune)
    job_id = submit(svc, spec)
    assert tasks.transfer_model.apply(args=[job_id]).get()["status"] == "succeeded"
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result is not None
    report = record.result["report"]
    assert (report["source_dataset"], report["target_dataset"]) == ("ucm", "aid")
    assert report["shared_classes"] == {
        "Airport": "airplane",
        "Beach": "beach",
        "Farmland": "agricultural",
    }
    assert report["unseen_classes"] == ["Bridge"]
    assert report["before"]["images"] == 12  # the shared classes' images only
    assert report["before"]["unseen"]["Bridge"]["images"] == 4
    assert report["fine_tune"]["split"] == {"train": 12, "val": 0, "test": 4}
    # No server path leaves the worker: the dataset by id, samples by their path in it.
    assert report["target_root"] == aid_dataset
    assert [s["path"].split("/")[0] for s in report["samples"]] == [
        "Airport",
        "Beach",
        "Farmland",
        "Bridge",
    ]
    # Every artifact the report names is a flat file of the job.
    artifacts = svc.settings.artifacts_dir / job_id
    names = {p.name for p in artifacts.iterdir()}
    assert not [p for p in artifacts.iterdir() if p.is_dir()]
    assert {"transfer_grid.png", "transfer.json"} <= names
    for sample in report["samples"]:
        for condition in ("before", "after"):
            for cam in sample[condition]["cams"]:
                assert set(cam["artifacts"].values()) <= names
    assert json.loads((artifacts / "transfer.json").read_text()) == report
    # The fine-tuned network is a new model of the target's classes, descending from the source.
    tuned = svc.models.get(record.result["model"])
    assert tuned is not None
    assert tuned.classes == AID_CLASSES
    assert [(s.op, s.parent_digest) for s in tuned.lineage][-1] == ("train", source)


def test_transfer_without_fine_tuning_produces_no_model(
    svc: runtime.WorkerServices,
    model_id: str,
    aid_dataset: str,
    class_mapping_file: Path,
) -> None:
    spec = transfer_spec(model_id, aid_dataset, class_mapping_file, samples_per_class=2)
    job_id = submit(svc, spec)
    tasks.transfer_model.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result is not None
    assert record.result["model"] is None
    report = record.result["report"]
    assert report["fine_tune"] is None
    assert report["unseen_classes"] == ["Bridge"]  # the tiny model lacks intersection's twin
    assert len(report["samples"]) == 2 * len(AID_CLASSES)
    assert all(s["after"] is None for s in report["samples"])
