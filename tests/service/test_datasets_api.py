"""/v1/datasets: zip uploads of real UC Merced images, registration. (Refused uploads — unsafe
archives, zip bombs, bad layouts — are in test_bad_input.py.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.support import dataset_zip, ucm_images, zip_bytes

CLASSES = ["agricultural", "airplane", "beach"]


def upload(
    client: TestClient, data: bytes, filename: str = "ucm.zip", **form: str
) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=form)


def assert_nothing_stored(client: TestClient, settings: Settings) -> None:
    assert client.get("/v1/datasets").json()["items"] == []
    assert list(settings.datasets_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []


def test_upload_a_class_folder_zip(client: TestClient, ucm_dir: Path, settings: Settings) -> None:
    response = upload(client, dataset_zip(ucm_dir, CLASSES, 2), filename="three.zip")
    assert response.status_code == 201, response.text
    info = response.json()
    assert response.headers["location"] == f"/v1/datasets/{info['id']}"
    assert info["name"] == "three"
    assert info["classes"] == CLASSES
    assert info["counts"] == dict.fromkeys(CLASSES, 2)
    assert info["num_images"] == 6
    assert info["source"] == "upload"
    stored = settings.datasets_dir / info["id"] / "data"
    assert sorted(p.name for p in stored.iterdir()) == CLASSES


def test_the_distributed_ucm_layout_is_unwrapped(client: TestClient, ucm_dir: Path) -> None:
    data = dataset_zip(ucm_dir, CLASSES[:2], 1, top="UCMerced_LandUse/Images/")
    response = upload(client, data)
    assert response.status_code == 201, response.text
    assert response.json()["classes"] == CLASSES[:2]


def test_name_list_get_delete(client: TestClient, ucm_dir: Path, settings: Settings) -> None:
    created = upload(
        client, dataset_zip(ucm_dir, CLASSES[:2], 1), filename="ignored.zip", name="mine"
    )
    info = created.json()
    assert info["name"] == "mine"
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [info["id"]]
    assert client.get(f"/v1/datasets/{info['id']}").json() == info
    assert client.delete(f"/v1/datasets/{info['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{info['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{info['id']}").status_code == 404
    assert_nothing_stored(client, settings)


def test_a_zip_that_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    """Headers that under-declare a member's size do not get more bytes than declared out."""
    from core.exceptions import DatasetError
    from service.catalog.archive import ArchiveLimits, extract_zip

    archive = tmp_path / "liar.zip"
    archive.write_bytes(zip_bytes({"a/x.jpg": b"\0" * 1_000_000}))
    with zipfile.ZipFile(archive) as zf:
        info = zf.infolist()[0]
    # Patch the declared size in the central directory (and local header) to 10 bytes.
    raw = bytearray(archive.read_bytes())
    declared = info.file_size.to_bytes(4, "little")
    raw = bytearray(bytes(raw).replace(declared, (10).to_bytes(4, "little")))
    archive.write_bytes(bytes(raw))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DatasetError):
        extract_zip(archive, target, ArchiveLimits(max_files=10, max_total_bytes=100_000))
    written = [p.stat().st_size for p in target.rglob("*") if p.is_file()]
    assert sum(written) <= 100_000


def test_a_non_zip_is_unsupported_media(client: TestClient, ucm_dir: Path) -> None:
    image = next((ucm_dir / "beach").glob("*.jpg"))
    response = upload(client, image.read_bytes(), filename="beach.jpg")
    assert response.status_code == 415


def test_register_is_off_by_default(client: TestClient, ucm_dir: Path) -> None:
    response = client.post("/v1/datasets/register", json={"path": str(ucm_dir), "name": "ucm"})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"


def test_register_a_folder_under_an_allowed_root(tmp_path: Path, ucm_dir: Path) -> None:
    root = tmp_path / "shared"
    for cls, paths in ucm_images(ucm_dir, CLASSES, 2).items():
        (root / "ucm" / cls).mkdir(parents=True)
        for path in paths:
            (root / "ucm" / cls / path.name).write_bytes(path.read_bytes())
    settings = Settings(
        data_dir=tmp_path / "var", allow_dataset_register=True, dataset_register_roots=[root]
    )
    with TestClient(create_app(settings)) as client:
        created = client.post(
            "/v1/datasets/register", json={"path": str(root / "ucm"), "name": "ucm"}
        )
        assert created.status_code == 201, created.text
        assert created.json()["counts"] == dict.fromkeys(CLASSES, 2)
        assert created.json()["source"] == "registered"
        outside = client.post("/v1/datasets/register", json={"path": str(ucm_dir), "name": "x"})
        assert outside.status_code == 403
        assert outside.json()["errors"][0]["field"] == "path"
        relative = client.post("/v1/datasets/register", json={"path": "ucm", "name": "x"})
        assert relative.status_code == 422
        # Deleting a registered dataset forgets it but leaves the folder alone.
        assert client.delete(f"/v1/datasets/{created.json()['id']}").status_code == 204
    assert len(list((root / "ucm" / CLASSES[0]).iterdir())) == 2


def test_register_needs_json(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", allow_dataset_register=True)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/datasets/register", data={"path": "/x", "name": "x"})
    assert response.status_code == 415
