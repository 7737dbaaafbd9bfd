"""/v1/models with a real checkpoint written by core.checkpoint. (Refused uploads — pickles,
garbage, checkpoints contradicting their weights — are in test_bad_input.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from tests.service.support import TINY_CLASSES, TINY_INPUT_SIZE


def upload(client: TestClient, data: bytes, name: str = "m.safetensors") -> httpx.Response:
    return client.post("/v1/models", files={"file": (name, data)})


def test_upload_describes_the_checkpoint(client: TestClient, tiny_checkpoint: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    response = upload(client, data)
    assert response.status_code == 201, response.text
    body = response.json()
    expected_id = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert response.headers["location"] == f"/v1/models/{expected_id}"
    assert body["id"] == expected_id
    assert body["arch"] == "resnet18"
    assert body["classes"] == TINY_CLASSES
    assert body["num_classes"] == 3
    assert body["input_size"] == TINY_INPUT_SIZE
    assert body["builtin"] is False
    assert body["size_bytes"] == len(data)
    assert body["damage"] is None
    assert body["has_damage_masks"] is False
    assert body["created_at"]


def test_list_get_delete(client: TestClient, model_id: str) -> None:
    listed = client.get("/v1/models").json()["items"]
    assert [m["id"] for m in listed] == ["resnet50:imagenet", model_id]
    builtin = listed[0]
    assert builtin["builtin"] is True
    assert builtin["classes"] is None
    assert builtin["num_classes"] == 1000
    assert client.get(f"/v1/models/{model_id}").json()["id"] == model_id
    assert client.get("/v1/models/resnet50:imagenet").json()["builtin"] is True

    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    gone = client.get(f"/v1/models/{model_id}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"
    assert client.delete(f"/v1/models/{model_id}").status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == ["resnet50:imagenet"]


def test_builtin_models_cannot_be_deleted(client: TestClient) -> None:
    response = client.delete("/v1/models/resnet50:imagenet")
    assert response.status_code == 409
    assert response.json()["type"] == "urn:camres:problem:builtin-model"


def test_uploading_the_same_bytes_twice_keeps_one_model(
    client: TestClient, tiny_checkpoint: Path, model_id: str
) -> None:
    again = upload(client, tiny_checkpoint.read_bytes())
    assert again.status_code == 201
    assert again.json()["id"] == model_id
    assert len(client.get("/v1/models").json()["items"]) == 2


def test_a_json_body_is_unsupported_media(client: TestClient) -> None:
    response = client.post("/v1/models", json={"file": "x"})
    assert response.status_code == 415
    assert response.json()["type"] == "urn:camres:problem:unsupported-media-type"


def test_malformed_ids_are_not_found(client: TestClient) -> None:
    for model_id in ("sha256:xyz", "..%2F..%2Fetc", "sha256:" + "0" * 64):
        response = client.get(f"/v1/models/{model_id}")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
