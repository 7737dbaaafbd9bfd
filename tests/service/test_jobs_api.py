"""/v1/jobs on the embedded broker: admission, validation naming fields, listing, cancel,
artifacts. No worker runs here, so submitted jobs stay queued; the broker message is real.
(Refused inputs — bad images, limits, malformed specs — are in test_bad_input.py.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.store import JobProgress

CAM = {"kind": "cam", "cam": {"top_k": 1}}


def submit(
    client: TestClient, spec: dict[str, Any] | str, images: Sequence[tuple[str, bytes]] = ()
) -> httpx.Response:
    raw = spec if isinstance(spec, str) else json.dumps(spec)
    # (None, value) is a plain form field; sent as a part, it keeps the body multipart.
    files: list[tuple[str, Any]] = [("spec", (None, raw))]
    files += [("images", (name, data, "image/jpeg")) for name, data in images]
    return client.post("/v1/jobs", files=files)


def broker_messages(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """(queue, headers) of the messages waiting in the embedded broker."""
    messages = []
    for path in sorted((settings.broker_dir / "queue").glob("*.msg")):
        queue = path.name.split(".")[-2]
        messages.append((queue, json.loads(path.read_text())["headers"]))
    return messages


def field_errors(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"] == "application/problem+json", response.text
    return {e["field"]: e["message"] for e in response.json()["errors"]}


@pytest.fixture
def image(ucm_image: Path) -> tuple[str, bytes]:
    return (ucm_image.name, ucm_image.read_bytes())


def test_submit_a_cam_job(
    client: TestClient, settings: Settings, model_id: str, image: tuple[str, bytes]
) -> None:
    response = submit(client, {**CAM, "model": model_id}, [image])
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["kind"] == "cam"
    assert job["spec"]["model"] == model_id
    assert job["spec"]["cam"]["har_threshold"] == 0.2  # defaults are filled in and echoed
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "artifacts": f"/v1/jobs/{job['id']}/artifacts",
    }
    assert client.get(job["links"]["self"]).json()["status"] == "queued"
    # The task went to the real (filesystem) broker under the job's id, on the GPU queue's
    # batch queue: a one-image intact CAM job may share a forward pass (worker/batching.py).
    queued = [(queue, h["task"], h["id"]) for queue, h in broker_messages(settings)]
    assert queued == [("gpu-batch", "camres.cam", job["id"])]
    stored = settings.uploads_dir / job["id"]
    manifest = json.loads((stored / "manifest.json").read_text())
    assert manifest["images"][0]["name"] == image[0]
    assert (stored / manifest["images"][0]["file"]).read_bytes() == image[1]


def test_damage_jobs_go_to_the_cpu_queue(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    spec = {"kind": "damage", "model": model_id, "damage": {"fraction": 0.1}}
    response = submit(client, spec)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["damage"]["targets"] == ["D1", "D2", "D3", "D4"]
    assert [(q, h["task"]) for q, h in broker_messages(settings)] == [("cpu", "camres.damage")]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**CAM, "damage": {"fraction": 0.1, "fault": {"kind": "melt"}}}, "spec.damage.fault"),
        ({**CAM, "cam": {"top_k": 0}}, "spec.cam.top_k"),
        ({**CAM, "cam": {"colormap": "rainbow"}}, "spec.cam.colormap"),
        ({**CAM, "surprise": 1}, "spec.surprise"),
        ({"model": "m"}, "spec.kind"),
        ({"kind": "paint", "model": "m"}, "spec.kind"),
        (
            {"kind": "train", "dataset": "d", "arch": "resnet18", "config": {"epochs": 0}},
            "spec.config.epochs",
        ),
        ({"kind": "evaluate", "model": "m"}, "spec.dataset"),
    ],
)
def test_validation_errors_name_the_field(
    client: TestClient, model_id: str, image: tuple[str, bytes], spec: dict[str, Any], field: str
) -> None:
    spec = {"model": model_id, **spec}
    response = submit(client, spec, [image] if spec.get("kind") == "cam" else [])
    assert response.status_code == 422, response.text
    assert field in field_errors(response), response.json()
    assert response.json()["type"] == "urn:camres:problem:validation-error"


def test_a_urlencoded_form_is_accepted_and_json_is_not(client: TestClient, model_id: str) -> None:
    spec = json.dumps({"kind": "damage", "model": model_id, "damage": {"fraction": 0.1}})
    assert client.post("/v1/jobs", data={"spec": spec}).status_code == 202
    as_json = client.post("/v1/jobs", json={"spec": spec})
    assert as_json.status_code == 415
    assert as_json.json()["type"] == "urn:camres:problem:unsupported-media-type"


def test_references_are_checked(
    client: TestClient, model_id: str, image: tuple[str, bytes]
) -> None:
    unknown_model = submit(client, {**CAM, "model": "sha256:" + "0" * 64}, [image])
    assert unknown_model.status_code == 422
    assert "spec.model" in field_errors(unknown_model)
    unknown_class = submit(
        client, {"kind": "cam", "model": model_id, "cam": {"classes": ["moon"]}}, [image]
    )
    assert "spec.cam.classes" in field_errors(unknown_class)
    no_images = submit(client, {**CAM, "model": model_id})
    assert "images" in field_errors(no_images)
    unknown_dataset = submit(client, {**CAM, "model": model_id, "images": {"dataset": "ds-x"}})
    assert "spec.images.dataset" in field_errors(unknown_dataset)
    not_damaged = submit(client, {"kind": "retrain", "model": model_id, "dataset": "ds-x"})
    errors = field_errors(not_damaged)
    assert "damage masks" in errors["spec.model"]
    assert "spec.dataset" in errors
    images_on_damage = submit(
        client, {"kind": "damage", "model": model_id, "damage": {"fraction": 0.5}}, [image]
    )
    assert "images" in field_errors(images_on_damage)
    retrain_without_damage = submit(
        client, {**CAM, "model": model_id, "retrain": {"dataset": "ds-x"}}, [image]
    )
    assert "spec.retrain" in field_errors(retrain_without_damage)


def test_dataset_images_are_checked_against_the_dataset(
    client: TestClient, model_id: str, ucm_dir: Path
) -> None:
    from tests.service.support import dataset_zip

    dataset = client.post(
        "/v1/datasets", files={"file": ("d.zip", dataset_zip(ucm_dir, ["beach", "forest"], 2))}
    ).json()["id"]
    ok = submit(client, {**CAM, "model": model_id, "images": {"dataset": dataset, "limit": 2}})
    assert ok.status_code == 202, ok.text
    wrong = submit(
        client, {**CAM, "model": model_id, "images": {"dataset": dataset, "classes": ["moon"]}}
    )
    assert "spec.images.classes" in field_errors(wrong)


def test_unknown_jobs_are_404_problems(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/jobs/nope"),
        ("POST", "/v1/jobs/nope/cancel"),
        ("GET", "/v1/jobs/nope/artifacts"),
        ("GET", "/v1/jobs/nope/artifacts/x.png"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 404
        assert response.json()["instance"] == path


def test_cancel_a_queued_job(client: TestClient, model_id: str, image: tuple[str, bytes]) -> None:
    job = submit(client, {**CAM, "model": model_id}, [image]).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["type"] == "urn:camres:problem:job-finished"


def test_list_pages_and_filters(
    client: TestClient, model_id: str, image: tuple[str, bytes]
) -> None:
    ids = [submit(client, {**CAM, "model": model_id}, [image]).json()["id"] for _ in range(3)]
    damage = {"kind": "damage", "model": model_id, "damage": {"fraction": 0.2}}
    ids.append(submit(client, damage).json()["id"])
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [j["id"] for j in client.get("/v1/jobs?kind=damage").json()["items"]] == [ids[3]]
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").json()["items"]] == [ids[0]]
    assert "status" in field_errors(client.get("/v1/jobs?status=sleeping"))
    assert "cursor" in field_errors(client.get("/v1/jobs?cursor=forged"))
    assert "limit" in field_errors(client.get("/v1/jobs?limit=100000"))


def test_progress_and_results_written_by_a_worker_are_served(
    client: TestClient,
    app,
    model_id: str,
    image: tuple[str, bytes],
) -> None:
    job = submit(client, {**CAM, "model": model_id}, [image]).json()
    store = app.state.camres.store
    store.start(job["id"], "w1")
    store.set_progress(job["id"], JobProgress(fraction=0.5, stage="cam", message="1/2"))
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert running["status"] == "running"
    assert running["started_at"]
    assert running["progress"] == {"fraction": 0.5, "stage": "cam", "message": "1/2", "metrics": {}}
    store.finish(job["id"], "succeeded", result={"images": []})
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert done["result"]["images"] == []
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_artifacts(
    client: TestClient, settings: Settings, model_id: str, image: tuple[str, bytes]
) -> None:
    job = submit(client, {**CAM, "model": model_id}, [image]).json()
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json() == {"items": []}
    folder = settings.artifacts_dir / job["id"]
    folder.mkdir(parents=True)
    (folder / "000_intact_x_overlay.png").write_bytes(b"\x89PNG fake")
    (folder / "result.json").write_text("{}")
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    assert [(a["name"], a["media_type"], a["size"]) for a in listed] == [
        ("000_intact_x_overlay.png", "image/png", 9),
        ("result.json", "application/json", 2),
    ]
    download = client.get(listed[0]["url"])
    assert download.status_code == 200
    assert download.content == b"\x89PNG fake"
    assert download.headers["content-type"] == "image/png"
    missing = client.get(f"/v1/jobs/{job['id']}/artifacts/nothing.png")
    assert missing.status_code == 404


def test_a_broker_failure_fails_the_job_and_answers_503(
    tmp_path: Path, tiny_checkpoint: Path, ucm_image: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        broker_url="redis://127.0.0.1:1/0",  # nothing listens there
        store_url=f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
    )
    with TestClient(create_app(settings)) as client:
        model = client.post(
            "/v1/models", files={"file": ("m.safetensors", tiny_checkpoint.read_bytes())}
        ).json()["id"]
        response = submit(
            client, {**CAM, "model": model}, [(ucm_image.name, ucm_image.read_bytes())]
        )
        assert response.status_code == 503
        assert response.json()["type"] == "urn:camres:problem:broker-unavailable"
        [job] = client.get("/v1/jobs").json()["items"]
        assert job["status"] == "failed"
        assert job["error"]["type"] == "BrokerError"
        # The gateway keeps serving.
        assert client.get("/healthz").status_code == 200
