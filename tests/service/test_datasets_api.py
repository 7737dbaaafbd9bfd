"""/v1/datasets: zip uploads of real UC Merced images, unsafe archives, registration."""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
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


@pytest.mark.parametrize(
    ("members", "symlinks", "message"),
    [
        ({"a/x.jpg": b"1", "../evil.jpg": b"2"}, None, "outside"),
        ({"a/x.jpg": b"1", "/etc/evil.jpg": b"2"}, None, "absolute"),
        ({"a/x.jpg": b"1", "a\\..\\evil.jpg": b"2"}, None, "non-portable"),
        ({"a/x.jpg": b"1"}, {"b/link.jpg": "/etc/passwd"}, "symbolic link"),
    ],
)
def test_unsafe_members_are_refused(
    client: TestClient,
    settings: Settings,
    members: dict[str, bytes],
    symlinks: dict[str, str] | None,
    message: str,
) -> None:
    response = upload(client, zip_bytes(members, symlinks=symlinks))  # type: ignore[arg-type]
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["field"] == "file"
    assert message in problem["detail"]
    assert_nothing_stored(client, settings)


@pytest.fixture
def strict_client(tmp_path: Path) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "strict",
        max_dataset_files=4,
        max_dataset_uncompressed_bytes=200_000,
    )
    app: FastAPI = create_app(settings)
    return TestClient(app)


def test_too_many_files(strict_client: TestClient, ucm_dir: Path) -> None:
    response = upload(strict_client, dataset_zip(ucm_dir, CLASSES, 2))
    assert response.status_code == 422
    assert "over the limit of 4" in response.json()["detail"]


def test_a_zip_bomb_is_refused(strict_client: TestClient) -> None:
    # 10 MB of zeros deflates to ~10 kB: the inflated size is what counts.
    bomb = zip_bytes({"a/x.jpg": b"\0" * 10_000_000, "b/y.jpg": b"\0"})
    assert len(bomb) < 100_000
    response = upload(strict_client, bomb)
    assert response.status_code == 422
    assert "inflates" in response.json()["detail"]


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


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("one-class", "at least 2 class"),
        ("empty-class", "holds no images"),
        ("corrupt-image", "not a readable image"),
    ],
)
def test_bad_layouts(
    client: TestClient, ucm_dir: Path, settings: Settings, layout: str, message: str
) -> None:
    images = ucm_images(ucm_dir, CLASSES[:2], 1)
    first, second = images[CLASSES[0]][0], images[CLASSES[1]][0]
    members: dict[str, bytes | Path] = {f"{CLASSES[0]}/{first.name}": first}
    if layout == "empty-class":
        members[f"{CLASSES[1]}/README.txt"] = b"no images here"
    elif layout == "corrupt-image":
        members[f"{CLASSES[1]}/{second.name}"] = second.read_bytes()[:200]
        members[f"{CLASSES[1]}/fake.jpg"] = b"this is not a JPEG"
    response = upload(client, zip_bytes(members))
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert response.json()["errors"][0]["field"] == "file"
    assert_nothing_stored(client, settings)


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


def test_service_layout_agrees_with_core(tmp_path: Path, ucm_dir: Path) -> None:
    """The gateway's torch-free scan finds what core.datasets will read in the worker."""
    from core.datasets import IMAGE_EXTENSIONS, ImageFolder
    from service.catalog.datasets import IMAGE_SUFFIXES, scan_layout

    assert IMAGE_SUFFIXES == IMAGE_EXTENSIONS
    folder = tmp_path / "wrapped" / "Images"
    for cls, paths in ucm_images(ucm_dir, CLASSES, 2).items():
        (folder / cls).mkdir(parents=True)
        for path in paths:
            (folder / cls / path.name).write_bytes(path.read_bytes())
    layout = scan_layout(tmp_path / "wrapped", max_pixels=10**8)
    core_folder = ImageFolder.from_path(layout.root)
    assert core_folder.classes == list(layout.images)
    assert core_folder.class_counts() == {c: len(f) for c, f in layout.images.items()}
