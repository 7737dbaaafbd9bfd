"""API keys and isolation: keys in a header, each owner sees only their own models, datasets and
jobs (another owner's are 404), an admin key sees everything, keys come from the settings."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.app import create_app
from service.auth import KeyRing
from service.settings import Settings
from tests.service.support import dataset_zip

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
PROBLEM = "application/problem+json"


def keyed(**values: Any) -> Settings:
    """Settings given as the environment gives them (keys as text)."""
    return Settings.model_validate(values)


class Tenant:
    """One client of the shared gateway, sending its key with every request."""

    def __init__(self, client: TestClient, key: str | None) -> None:
        self.client = client
        self.headers = {"X-API-Key": key} if key else {}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers=self.headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers=self.headers, **kwargs)

    def delete(self, path: str) -> httpx.Response:
        return self.client.delete(path, headers=self.headers)

    def ids(self, path: str) -> list[str]:
        response = self.get(path)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[TestClient]:
    settings = keyed(
        data_dir=tmp_path / "var",
        api_keys=f"{ALICE}:alice,{BOB}:bob",  # the CSV form of CAMRES_API_KEYS
        admin_keys=json.dumps({ADMIN: "ops"}),  # the JSON form
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.camres.close()


def test_keys_are_parsed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMRES_API_KEYS", json.dumps({ALICE: "alice", BOB: "bob"}))
    monkeypatch.setenv("CAMRES_ADMIN_KEYS", ADMIN)
    settings = Settings()
    assert settings.api_keys == {ALICE: "alice", BOB: "bob"}
    assert settings.admin_keys == {ADMIN: "admin"}  # an admin key's owner is optional
    assert settings.auth_enabled
    assert ALICE not in repr(settings)
    assert not keyed(api_keys="", admin_keys="").auth_enabled


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("short:alice", "at least 16 characters"),
        (f"{ALICE}", "needs an owner"),
        (f"{ALICE}:../etc", "must be 1–64 letters"),
        ('["not", "a", "mapping"]', "JSON object or"),
    ],
)
def test_bad_key_settings_are_refused_without_echoing_them(keys: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        keyed(api_keys=keys)
    assert message in str(info.value)
    assert ALICE not in str(info.value)


def test_a_key_cannot_be_both_client_and_admin() -> None:
    with pytest.raises(ValidationError, match="both a client key and an admin key"):
        keyed(api_keys=f"{ALICE}:alice", admin_keys=f"{ALICE}:ops")


def test_the_key_ring_keeps_digests_only() -> None:
    ring = KeyRing(keyed(api_keys=f"{ALICE}:alice", admin_keys=ADMIN))
    assert ALICE not in repr(vars(ring))
    assert ring.authenticate(ALICE) == ring.authenticate(ALICE)
    alice = ring.authenticate(ALICE)
    assert alice is not None
    assert (alice.owner, alice.admin) == ("alice", False)
    admin = ring.authenticate(ADMIN)
    assert admin is not None
    assert admin.admin
    assert ring.authenticate(ALICE[:-1]) is None


def test_requests_without_a_valid_key_are_401(secured: TestClient) -> None:
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789abcdef"}):
        response = secured.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
        assert response.json()["type"] == "urn:camres:problem:unauthorized"
    missing = secured.post("/v1/jobs", data={"spec": "{}"})
    assert missing.status_code == 401
    assert "X-API-Key" in missing.json()["detail"]
    # Probes and the API description stay open.
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/openapi.json").status_code == 200
    # The bearer form works as well.
    bearer = secured.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}"})
    assert bearer.status_code == 200


def test_owners_see_only_their_own_resources(
    secured: TestClient, tiny_checkpoint: Path, ucm_image: Path, ucm_dir: Path
) -> None:
    alice, bob, admin = (Tenant(secured, key) for key in (ALICE, BOB, ADMIN))
    checkpoint = tiny_checkpoint.read_bytes()
    model = alice.post("/v1/models", files={"file": ("m.safetensors", checkpoint)}).json()
    assert model["owner"] == "alice"
    dataset = alice.post(
        "/v1/datasets", files={"file": ("d.zip", dataset_zip(ucm_dir, ["beach", "forest"], 1))}
    ).json()
    assert dataset["owner"] == "alice"
    spec = json.dumps({"kind": "cam", "model": model["id"]})
    job = alice.post(
        "/v1/jobs", files=[("spec", (None, spec)), ("images", ("a.jpg", ucm_image.read_bytes()))]
    ).json()

    # Bob sees none of it: listings leave it out, and every route answers as for a missing id.
    assert bob.ids("/v1/models") == ["resnet50:imagenet"]  # built-ins are everyone's
    assert bob.ids("/v1/datasets") == []
    assert bob.ids("/v1/jobs") == []
    for path in (
        f"/v1/models/{model['id']}",
        f"/v1/datasets/{dataset['id']}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/jobs/{job['id']}/artifacts/result.json",
    ):
        response = bob.get(path)
        assert response.status_code == 404, path
        assert response.json()["type"] == "urn:camres:problem:not-found"
    assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert bob.delete(f"/v1/models/{model['id']}").status_code == 404
    assert bob.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
    # ... nor can he use it in a job.
    refused = bob.post("/v1/jobs", data={"spec": json.dumps({
        "kind": "evaluate", "model": model["id"], "dataset": dataset["id"]
    })})  # fmt: skip
    assert refused.status_code == 422
    fields = {e["field"] for e in refused.json()["errors"]}
    assert fields == {"spec.model", "spec.dataset"}

    # The same bytes uploaded by Bob are Bob's own copy (same id): deleting it leaves Alice's.
    copy = bob.post("/v1/models", files={"file": ("m.safetensors", checkpoint)})
    assert copy.status_code == 201
    assert (copy.json()["id"], copy.json()["owner"]) == (model["id"], "bob")
    assert bob.delete(f"/v1/models/{model['id']}").status_code == 204
    assert alice.get(f"/v1/models/{model['id']}").status_code == 200

    # Alice sees hers; the admin sees everyone's.
    assert alice.ids("/v1/jobs") == [job["id"]]
    assert admin.ids("/v1/jobs") == [job["id"]]
    assert admin.get(f"/v1/datasets/{dataset['id']}").json()["owner"] == "alice"
    assert model["id"] in admin.ids("/v1/models")
    assert admin.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_registering_a_dataset_needs_an_admin_key(tmp_path: Path, ucm_dir: Path) -> None:
    shared = tmp_path / "shared"
    for cls in ("beach", "forest"):
        (shared / "ucm" / cls).mkdir(parents=True)
        source = sorted((ucm_dir / cls).glob("*.jpg"))[0]
        (shared / "ucm" / cls / source.name).write_bytes(source.read_bytes())
    settings = keyed(
        data_dir=tmp_path / "var",
        api_keys=f"{ALICE}:alice",
        admin_keys=ADMIN,
        allow_dataset_register=True,
        dataset_register_roots=[shared],
    )
    body = {"path": str(shared / "ucm"), "name": "ucm"}
    with TestClient(create_app(settings)) as client:
        alice, admin = Tenant(client, ALICE), Tenant(client, ADMIN)
        refused = alice.post("/v1/datasets/register", json=body)
        assert refused.status_code == 403
        assert "admin key" in refused.json()["detail"]
        registered = admin.post("/v1/datasets/register", json={**body, "owner": "alice"})
        assert registered.status_code == 201, registered.text
        assert alice.ids("/v1/datasets") == [registered.json()["id"]]


def test_without_keys_access_control_is_off(client: TestClient, model_id: str) -> None:
    """The embedded default: no key needed, everything shared and unowned."""
    response = client.get(f"/v1/models/{model_id}")
    assert response.status_code == 200
    assert response.json()["owner"] is None
