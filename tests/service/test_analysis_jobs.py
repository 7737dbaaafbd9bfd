"""Admission of transfer and sweep jobs: malformed specs and references that cannot work are
422s naming each field, good specs are queued for the workers, and their results and partial
artifacts are served as the worker writes them. No worker runs here (see
tests/worker/test_analysis_tasks.py for the tasks themselves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.support import dataset_zip, make_tiny_checkpoint, zip_bytes
from tests.service.test_jobs_api import broker_messages, field_errors, submit

SWEEP = {"locations": ["D4"], "fractions": [0.25, 0.5], "trials": 1}


def upload_dataset(client: TestClient, data: bytes) -> str:
    response = client.post("/v1/datasets", files={"file": ("d.zip", data)})
    assert response.status_code == 201, response.text
    dataset: str = response.json()["id"]
    return dataset


@pytest.fixture
def ucm_dataset(client: TestClient, ucm_dir: Path) -> str:
    """Real UC Merced images of two of the tiny model's classes."""
    return upload_dataset(client, dataset_zip(ucm_dir, ["airplane", "beach"], 2))


@pytest.fixture
def aid_dataset(client: TestClient, aid_dir: Path) -> str:
    """Real AID images: two classes the tiny model knows by their UC Merced names, and Bridge."""
    members: dict[str, bytes | Path] = {
        f"{cls}/{path.name}": path
        for cls in ("Airport", "Beach", "Bridge")
        for path in sorted((aid_dir / cls).glob("*.jpg"))[:2]
    }
    return upload_dataset(client, zip_bytes(members))


@pytest.fixture
def mapping(class_mapping_file: Path) -> dict[str, Any]:
    """The shipped ucm_aid_classes.json, as a client sends it."""
    loaded: dict[str, Any] = json.loads(class_mapping_file.read_text())
    return loaded


# --- sweep ------------------------------------------------------------------------------------
def test_a_sweep_job_is_queued_with_its_defaults(
    client: TestClient, settings: Settings, model_id: str, ucm_dataset: str
) -> None:
    response = submit(client, {"kind": "sweep", "model": model_id, "dataset": ucm_dataset})
    assert response.status_code == 202, response.text
    job = response.json()
    config = job["spec"]["config"]
    assert config["locations"] == ["D1", "D2", "D3", "D4"]
    assert len(config["fractions"]) == 19
    assert (config["trials"], job["spec"]["split"], job["spec"]["limit"]) == (3, "all", None)
    queued = [(queue, h["task"], h["id"]) for queue, h in broker_messages(settings)]
    assert queued == [("gpu", "camres.sweep", job["id"])]


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"config": {**SWEEP, "fractions": [0.0, 1.5]}}, {"spec.config.fractions"}),
        ({"config": {**SWEEP, "trials": 0, "batch_size": 0}},
         {"spec.config.trials", "spec.config.batch_size"}),
        ({"config": {**SWEEP, "retrain_at": [0.75]}}, {"spec.config.retrain_at"}),
        ({"config": {**SWEEP, "locations": ["D4", "D4"]}}, {"spec.config.locations"}),
        ({"config": {**SWEEP, "fault": {"kind": "melt"}}}, {"spec.config.fault"}),
        ({"config": {**SWEEP, "speed": "fast"}}, {"spec.config.speed"}),
        ({"limit": 0, "split": "val"}, {"spec.limit", "spec.split"}),
        ({"mapping": {}}, {"spec.mapping"}),
    ],
)  # fmt: skip
def test_malformed_sweep_specs_name_their_fields(
    client: TestClient, model_id: str, change: dict[str, Any], fields: set[str]
) -> None:
    spec = {"kind": "sweep", "model": model_id, "dataset": "ds-x", "config": SWEEP, **change}
    response = submit(client, spec)
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "urn:camres:problem:validation-error"
    assert set(field_errors(response)) >= fields, response.json()


def test_sweep_references_are_checked_before_the_job_exists(
    client: TestClient, model_id: str, ucm_dataset: str, aid_dataset: str
) -> None:
    def errors(**spec: Any) -> dict[str, str]:
        response = submit(client, {"kind": "sweep", "config": SWEEP, **spec})
        assert response.status_code == 422, response.text
        assert response.json()["type"] == "urn:camres:problem:invalid-reference"
        return field_errors(response)

    unknown = errors(model="sha256:" + "0" * 64, dataset="ds-" + "0" * 32)
    assert set(unknown) == {"spec.model", "spec.dataset"}
    nowhere = errors(
        model=model_id, dataset=ucm_dataset, config={**SWEEP, "locations": ["D4", "layer9.*"]}
    )
    assert "'layer9.*' matches no module" in nowhere["spec.config.locations"]
    # AID names the model's classes differently: without a mapping nothing would be evaluated.
    assert "spec.mapping" in errors(model=model_id, dataset=aid_dataset)["spec.dataset"]
    wrong_mapping = errors(model=model_id, dataset=aid_dataset, mapping={"Airport": "moon"})
    assert "'moon'" in wrong_mapping["spec.mapping"]
    test_split = errors(
        model=model_id, dataset=aid_dataset, mapping={"Airport": "airplane"}, split="test"
    )
    assert set(test_split) == {"spec.split"}


def test_a_mapped_sweep_is_admitted(client: TestClient, model_id: str, aid_dataset: str) -> None:
    spec = {
        "kind": "sweep",
        "model": model_id,
        "dataset": aid_dataset,
        "mapping": {"Airport": "airplane", "Beach": "beach"},
        "config": SWEEP,
        "limit": 4,
    }
    assert submit(client, spec).status_code == 202


def test_a_running_sweeps_rows_and_its_result_are_served(
    client: TestClient, app: FastAPI, settings: Settings, model_id: str, ucm_dataset: str
) -> None:
    job = submit(
        client, {"kind": "sweep", "model": model_id, "dataset": ucm_dataset, "config": SWEEP}
    ).json()
    store = app.state.camres.store
    store.start(job["id"], "w1")
    folder = settings.artifacts_dir / job["id"]
    folder.mkdir(parents=True)
    (folder / "sweep_cells.jsonl").write_text('{"location": "D4", "fraction": 0.25}\n')
    [partial] = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    assert (partial["name"], partial["media_type"]) == ("sweep_cells.jsonl", "application/x-ndjson")
    assert client.get(partial["url"]).text.count("\n") == 1
    result = {
        "arch": "resnet18",
        "classes": ["agricultural", "airplane", "beach"],
        "images": 4,
        "intact_accuracy": 0.5,
        "cells": 2,
        "seconds": 1.5,
        "summary": [],
        "artifacts": {"cells_jsonl": "sweep_cells.jsonl"},
    }
    store.finish(job["id"], "succeeded", result=result)
    assert client.get(f"/v1/jobs/{job['id']}").json()["result"] == result


# --- transfer ---------------------------------------------------------------------------------
def test_a_transfer_job_is_queued(
    client: TestClient,
    settings: Settings,
    model_id: str,
    aid_dataset: str,
    mapping: dict[str, Any],
) -> None:
    spec = {"kind": "transfer", "model": model_id, "dataset": aid_dataset, "mapping": mapping}
    response = submit(client, {**spec, "fine_tune": {"epochs": 1}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["mapping"]["unseen"] == {"ucm": ["intersection"], "aid": ["Bridge"]}
    assert job["spec"]["fine_tune"]["test_fraction"] == 0.2
    assert job["spec"]["samples_per_class"] == 1
    queued = [(queue, h["task"], h["id"]) for queue, h in broker_messages(settings)]
    assert queued == [("gpu", "camres.transfer", job["id"])]


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"mapping": None}, {"spec.mapping"}),
        ({"mapping": {"ucm_to_aid": {}}}, {"spec.mapping.ucm_to_aid"}),
        ({"mapping": {"ucm_to_aid": {"beach": "Beach", "river": "Beach"}}},
         {"spec.mapping.ucm_to_aid"}),
        ({"mapping": {"ucm_to_aid": {"beach": "Beach"}, "unseen": {"mars": []}}},
         {"spec.mapping.unseen.mars"}),
        ({"samples_per_class": 0, "fine_tune": {"epochs": 0}},
         {"spec.samples_per_class", "spec.fine_tune.epochs"}),
        ({"cam": {"top_k": 0}}, {"spec.cam.top_k"}),
    ],
)  # fmt: skip
def test_malformed_transfer_specs_name_their_fields(
    client: TestClient,
    model_id: str,
    mapping: dict[str, Any],
    change: dict[str, Any],
    fields: set[str],
) -> None:
    spec = {"kind": "transfer", "model": model_id, "dataset": "ds-x", "mapping": mapping, **change}
    response = submit(client, {k: v for k, v in spec.items() if v is not None})
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "urn:camres:problem:validation-error"
    assert set(field_errors(response)) >= fields, response.json()


def test_transfer_references_and_settings_are_checked_before_the_job_exists(
    client: TestClient,
    model_id: str,
    ucm_dataset: str,
    aid_dataset: str,
    mapping: dict[str, Any],
    tmp_path: Path,
) -> None:
    def errors(**spec: Any) -> dict[str, str]:
        response = submit(client, {"kind": "transfer", "mapping": mapping, **spec})
        assert response.status_code == 422, response.text
        assert response.json()["type"] == "urn:camres:problem:invalid-reference"
        return field_errors(response)

    # A UC Merced model on UC Merced images is no transfer.
    same_side = errors(model=model_id, dataset=ucm_dataset)
    assert set(same_side) == {"spec.dataset"}
    assert "no class of the target folder" in same_side["spec.dataset"]
    # A model whose classes the mapping does not name: no direction to transfer in.
    strange = tmp_path / "strange.safetensors"
    make_tiny_checkpoint(strange, ["cats", "dogs"])
    response = client.post("/v1/models", files={"file": ("s.safetensors", strange.read_bytes())})
    assert set(errors(model=response.json()["id"], dataset=aid_dataset)) == {"spec.mapping"}
    builtin = errors(model="resnet50:imagenet", dataset=aid_dataset)
    assert set(builtin) == {"spec.model"}
    settings_at_fault = errors(
        model=model_id,
        dataset=aid_dataset,
        cam={"classes": ["beach"]},
        fine_tune={"init": "imagenet", "test_fraction": 0.0},
    )
    assert set(settings_at_fault) == {
        "spec.cam.classes",
        "spec.fine_tune.init",
        "spec.fine_tune.test_fraction",
    }


def test_a_transfer_result_is_served_as_stored(
    client: TestClient, app: FastAPI, model_id: str, aid_dataset: str, mapping: dict[str, Any]
) -> None:
    # A transfer result would also pass for a damage job's {model, details}: it must not be
    # read as one (and lose its report).
    spec = {"kind": "transfer", "model": model_id, "dataset": aid_dataset, "mapping": mapping}
    job = submit(client, spec).json()
    store = app.state.camres.store
    store.start(job["id"], "w1")
    result = {"model": "sha256:" + "1" * 64, "report": {"source_dataset": "ucm", "samples": []}}
    store.finish(job["id"], "succeeded", result=result)
    assert client.get(f"/v1/jobs/{job['id']}").json()["result"] == result
