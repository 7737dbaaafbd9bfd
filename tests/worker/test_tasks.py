"""The Celery tasks, run in-process (``Task.apply``, as celery's testing guide suggests) on
the real core: a tiny real checkpoint, real UC Merced images, real artifacts on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from service.auth import LOCAL
from service.store import JobRecord
from service.submission import MANIFEST, InputImage, Manifest
from tests.service.support import TINY_CLASSES
from worker import runtime, tasks


def submit(
    svc: runtime.WorkerServices,
    spec: dict[str, Any],
    images: list[Path] = (),  # type: ignore[assignment]
    owner: str | None = None,
) -> str:
    """What the gateway does: store the inputs, create the record."""
    job_id = f"job-{len(svc.store.list_jobs(limit=500).items)}"
    if images:
        folder = svc.settings.uploads_dir / job_id
        folder.mkdir(parents=True)
        entries = []
        for i, path in enumerate(images):
            shutil.copyfile(path, folder / f"{i:03d}-{path.name}")
            entries.append(InputImage(name=path.name, file=f"{i:03d}-{path.name}"))
        (folder / MANIFEST).write_text(Manifest(images=entries).model_dump_json())
    svc.store.create(JobRecord(id=job_id, kind=spec["kind"], spec=spec, owner=owner))
    return job_id


def finished(svc: runtime.WorkerServices, job_id: str) -> JobRecord:
    record = svc.store.get(job_id)
    assert record is not None
    return record


def assert_box_inside(box: dict[str, int], width: int, height: int) -> None:
    assert 0 <= box["x0"] < box["x1"] <= width
    assert 0 <= box["y0"] < box["y1"] <= height


def test_cam_task_on_uploaded_images(
    svc: runtime.WorkerServices, model_id: str, ucm_image: Path
) -> None:
    job_id = submit(svc, {"kind": "cam", "model": model_id, "cam": {"top_k": 2}}, [ucm_image])
    summary = tasks.cam.apply(args=[job_id]).get()
    assert summary == {"job": job_id, "status": "succeeded"}
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    [entry] = record.result["images"]  # type: ignore[index]
    assert entry["image"] == ucm_image.name
    intact = entry["conditions"]["intact"]
    width, height = Image.open(ucm_image).size
    assert (intact["width"], intact["height"]) == (width, height)
    assert [c["target"]["label"] for c in intact["cams"]] == [t["label"] for t in intact["top_k"]]
    artifacts = svc.settings.artifacts_dir / job_id
    for cam in intact["cams"]:
        for box in cam["boxes"]:
            assert_box_inside(box, width, height)
        with Image.open(artifacts / cam["artifacts"]["overlay"]) as overlay:
            assert overlay.format == "PNG"
            assert overlay.size == (width, height)
    assert json.loads((artifacts / "result.json").read_text()) == record.result
    assert record.progress.fraction == 1.0


def test_cam_task_on_dataset_images_reuses_the_cached_model(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str
) -> None:
    spec = {"kind": "cam", "model": model_id, "images": {"dataset": dataset_id, "limit": 1}}
    first = submit(svc, spec)
    tasks.cam.apply(args=[first])
    second = submit(svc, {**spec, "images": {"dataset": dataset_id, "classes": ["beach"]}})
    tasks.cam.apply(args=[second])
    names = [e["image"] for e in finished(svc, first).result["images"]]  # type: ignore[index]
    assert [n.split("/")[0] for n in names] == TINY_CLASSES
    assert [e["image"] for e in finished(svc, second).result["images"]] == [  # type: ignore[index]
        "beach/beach00.jpg"
    ]
    assert runtime.model_cache().loads == 1


def test_cam_task_with_an_unknown_class_fails_the_job(
    svc: runtime.WorkerServices, ucm_image: Path
) -> None:
    spec = {"kind": "cam", "model": "resnet50:imagenet", "cam": {}}
    job_id = submit(svc, spec, [ucm_image])
    tasks.cam.apply(args=[job_id])
    record = finished(svc, job_id)
    # Offline there are no ImageNet weights: the job fails with the core's clear error.
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type in {"WeightsUnavailableError"}


def test_a_model_deleted_after_submission_fails_the_job(
    svc: runtime.WorkerServices, model_id: str, ucm_image: Path
) -> None:
    job_id = submit(svc, {"kind": "cam", "model": model_id}, [ucm_image])
    svc.models.delete(model_id)
    tasks.cam.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "failed"
    assert record.error is not None
    assert (record.error.type, record.error.field) == ("CheckpointError", "spec.model")


def test_evaluate_task(svc: runtime.WorkerServices, model_id: str, dataset_id: str) -> None:
    job_id = submit(svc, {"kind": "evaluate", "model": model_id, "dataset": dataset_id})
    tasks.evaluate_model.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    result = record.result
    assert result is not None
    assert result["classes"] == TINY_CLASSES
    assert result["count"] == 6
    assert sum(map(sum, result["confusion_matrix"])) == 6
    assert 0.0 <= result["accuracy"] <= 1.0
    artifact = svc.settings.artifacts_dir / job_id / "evaluation.json"
    assert json.loads(artifact.read_text()) == result


def test_evaluate_with_a_class_mapping(
    svc: runtime.WorkerServices, model_id: str, ucm_dir: Path, tmp_path: Path
) -> None:
    # An "AID-like" folder whose class names differ from the model's.
    folder = tmp_path / "renamed"
    renamed = {"Farmland": "agricultural", "Airport": "airplane", "Beach": "beach"}
    for new, old in renamed.items():
        (folder / new).mkdir(parents=True)
        shutil.copyfile(sorted((ucm_dir / old).glob("*.jpg"))[0], folder / new / "a.jpg")
    dataset = svc.datasets.register(folder, "renamed", max_pixels=10**8).id
    spec = {"kind": "evaluate", "model": model_id, "dataset": dataset, "mapping": renamed}
    job_id = submit(svc, spec)
    tasks.evaluate_model.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result["per_class_count"] == dict.fromkeys(TINY_CLASSES, 1)  # type: ignore[index]


def test_damage_task_stores_a_damaged_model(svc: runtime.WorkerServices, model_id: str) -> None:
    spec = {
        "kind": "damage",
        "model": model_id,
        "damage": {"targets": ["D4"], "fraction": 0.5, "seed": 3},
    }
    job_id = submit(svc, spec)
    tasks.damage.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result is not None
    new_id = record.result["model"]
    assert new_id != model_id
    info = svc.models.get(new_id)
    assert info is not None
    assert info.has_damage_masks
    assert info.damage is not None
    assert (info.damage.targets, info.damage.fraction) == (["D4"], 0.5)
    assert [(s.op, s.parent_digest) for s in info.lineage][-1] == ("damage", model_id)
    assert svc.models.checkpoint_path(new_id) is not None
    assert record.progress.fraction == 1.0


def test_damage_that_matches_no_layer_fails_with_the_field(
    svc: runtime.WorkerServices, model_id: str
) -> None:
    spec = {
        "kind": "damage",
        "model": model_id,
        "damage": {"targets": ["nothing.*"], "fraction": 0.1},
    }
    job_id = submit(svc, spec)
    tasks.damage.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "DamageSpecError"
    assert record.error.field == "targets"
    assert [m.id for m in svc.models.list_for(LOCAL) if not m.builtin] == [model_id]


def test_train_task_from_a_stored_checkpoint(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str
) -> None:
    config = {
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.01,
        "val_fraction": 0.0,
        "test_fraction": 0.0,
        "device": "cpu",
        "amp": False,
        "init": {"kind": "checkpoint", "checkpoint": model_id},
    }
    job_id = submit(svc, {"kind": "train", "dataset": dataset_id, "config": config})
    tasks.train.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result is not None
    info = svc.models.get(record.result["model"])
    assert info is not None
    assert info.arch == "resnet18"
    assert info.classes == TINY_CLASSES
    assert [(s.op, s.parent_digest) for s in info.lineage][-1] == ("train", model_id)
    assert len(record.result["details"]["train"]["history"]) == 1
    assert (svc.settings.artifacts_dir / job_id / "training.json").is_file()


TINY_TRAINING = {
    "epochs": 1,
    "batch_size": 4,
    "lr": 0.01,
    "val_fraction": 0.0,
    "test_fraction": 0.0,
    "device": "cpu",
    "amp": False,
}


def test_cam_task_under_damage_leaves_the_cached_model_intact(
    svc: runtime.WorkerServices, model_id: str, ucm_image: Path
) -> None:
    damage = {"targets": ["D3", "D4"], "fraction": 0.5, "seed": 1}
    spec = {"kind": "cam", "model": model_id, "cam": {"classes": ["airplane"]}, "damage": damage}
    job_id = submit(svc, spec, [ucm_image])
    tasks.cam.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    result = record.result
    assert result is not None
    conditions = result["images"][0]["conditions"]
    assert set(conditions) == {"intact", "damaged", "retrained"}
    assert conditions["retrained"] is None
    assert result["damage"]["damaged"] > 0
    assert result["damage"]["spec"]["targets"] == ["D3", "D4"]
    intact, broken = conditions["intact"]["cams"][0], conditions["damaged"]["cams"][0]
    assert intact["target"]["label"] == broken["target"]["label"] == "airplane"
    assert intact["target"]["probability"] != broken["target"]["probability"]
    artifacts = svc.settings.artifacts_dir / job_id
    assert (artifacts / intact["artifacts"]["overlay"]).is_file()
    assert (artifacts / broken["artifacts"]["overlay"]).is_file()
    assert intact["artifacts"]["overlay"] != broken["artifacts"]["overlay"]

    # The next job on the cached model sees the intact weights again.
    again = submit(
        svc, {"kind": "cam", "model": model_id, "cam": {"classes": ["airplane"]}}, [ucm_image]
    )
    tasks.cam.apply(args=[again])
    later = finished(svc, again).result["images"][0]["conditions"]["intact"]  # type: ignore[index]
    assert later["cams"][0]["target"] == intact["target"]
    assert runtime.model_cache().loads == 1


def test_cam_task_with_masked_retraining(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str, ucm_image: Path
) -> None:
    spec = {
        "kind": "cam",
        "model": model_id,
        "damage": {"targets": ["D4"], "fraction": 0.3},
        "retrain": {"dataset": dataset_id, "config": TINY_TRAINING},
    }
    job_id = submit(svc, spec, [ucm_image])
    tasks.cam.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    result = record.result
    assert result is not None
    conditions = result["images"][0]["conditions"]
    assert all(conditions[c] is not None for c in ("intact", "damaged", "retrained"))
    assert len(result["retrain"]["result"]["history"]) == 1
    check = result["retrain"]["damage_check"]
    assert check["ok"]
    assert check["mismatched"] == 0
    assert check["damaged"] > 0
    artifacts = {p.name for p in (svc.settings.artifacts_dir / job_id).iterdir()}
    for condition in ("intact", "damaged", "retrained"):
        for cam in conditions[condition]["cams"]:
            assert cam["artifacts"]["overlay"] in artifacts
            assert cam["artifacts"]["overlay"].startswith(f"000_{condition}_")


def test_retrain_task_stores_the_retrained_model(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str
) -> None:
    damage_job = submit(
        svc, {"kind": "damage", "model": model_id, "damage": {"targets": ["D4"], "fraction": 0.3}}
    )
    tasks.damage.apply(args=[damage_job])
    damaged_id = finished(svc, damage_job).result["model"]  # type: ignore[index]
    job_id = submit(
        svc,
        {"kind": "retrain", "model": damaged_id, "dataset": dataset_id, "config": TINY_TRAINING},
    )
    tasks.retrain.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "succeeded", record.error
    assert record.result is not None
    info = svc.models.get(record.result["model"])
    assert info is not None
    assert info.has_damage_masks
    assert [(s.op, s.parent_digest) for s in info.lineage][-1] == ("retrain", damaged_id)
    assert len(record.result["details"]["train"]["history"]) == 1


def test_retraining_an_intact_model_fails_the_job(
    svc: runtime.WorkerServices, model_id: str, dataset_id: str
) -> None:
    spec = {"kind": "retrain", "model": model_id, "dataset": dataset_id, "config": TINY_TRAINING}
    job_id = submit(svc, spec)
    tasks.retrain.apply(args=[job_id])
    record = finished(svc, job_id)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "CheckpointError"


def test_jobs_use_and_produce_their_owners_models_only(
    svc: runtime.WorkerServices, tiny_checkpoint: Path
) -> None:
    copy = svc.models.new_tmp_path()
    shutil.copyfile(tiny_checkpoint, copy)
    alices, _ = svc.models.add(copy, "alice")
    damage = {"targets": ["D4"], "fraction": 0.2}
    mine = submit(svc, {"kind": "damage", "model": alices.id, "damage": damage}, owner="alice")
    theirs = submit(svc, {"kind": "damage", "model": alices.id, "damage": damage}, owner="bob")
    tasks.damage.apply(args=[mine])
    tasks.damage.apply(args=[theirs])
    produced = finished(svc, mine).result["model"]  # type: ignore[index]
    assert svc.models.get(produced, "alice") is not None
    assert svc.models.get(produced, "bob") is None
    assert svc.models.get(produced) is None  # not among the unowned models either
    refused = finished(svc, theirs)
    assert refused.status == "failed"
    assert refused.error is not None
    assert (refused.error.type, refused.error.field) == ("CheckpointError", "spec.model")
