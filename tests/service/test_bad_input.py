"""The bad-input catalogue: every kind of bad input a client can send, each refused with a 4xx
``application/problem+json`` that names the field at fault and says precisely why, after which
the service keeps serving and has stored nothing.

One gateway serves the whole catalogue (with small limits so that the limit cases stay small);
each case is one request. Real inputs throughout: UC Merced images cut short, a real checkpoint
whose metadata was rewritten to lie, a pickle that would create a file if it were loaded.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from core.images import decode_image
from service.app import create_app
from service.settings import Settings
from tests.service.support import (
    executable_pickle,
    png_header_only,
    rewrite_meta,
    ucm_images,
    zip_bytes,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MiB = 1024 * 1024
PROBLEM = "application/problem+json"


@dataclass
class Service:
    """The gateway under test and the real material the cases are made of."""

    client: TestClient
    settings: Settings
    model: str
    job: str
    checkpoint: bytes
    ucm_dir: Path
    tif: bytes
    scratch: Path

    @property
    def jpeg(self) -> bytes:
        return (self.ucm_dir / "airplane" / "airplane00.jpg").read_bytes()

    def submit(
        self, spec: dict[str, Any] | str, images: Sequence[tuple[str, bytes]] = ()
    ) -> httpx.Response:
        raw = spec if isinstance(spec, str) else json.dumps(spec)
        files: list[tuple[str, Any]] = [("spec", (None, raw))]
        files += [("images", (name, data, "application/octet-stream")) for name, data in images]
        return self.client.post("/v1/jobs", files=files)

    def cam(self, *images: tuple[str, bytes]) -> httpx.Response:
        return self.submit({"kind": "cam", "model": self.model}, images)

    def damage(self, **damage: Any) -> httpx.Response:
        return self.submit({"kind": "damage", "model": self.model, "damage": damage})

    def upload_model(self, data: bytes, name: str = "model.safetensors") -> httpx.Response:
        return self.client.post("/v1/models", files={"file": (name, data)})

    def upload_dataset(self, data: bytes, name: str = "data.zip") -> httpx.Response:
        return self.client.post("/v1/datasets", files={"file": (name, data)})

    def dataset_of(self, **members: bytes | Path) -> httpx.Response:
        """A zip of real images plus ``members`` (keys use '__' for '/')."""
        first = ucm_images(self.ucm_dir, ["beach"], 1)["beach"][0]
        content: dict[str, bytes | Path] = {f"beach/{first.name}": first}
        content.update({name.replace("__", "/"): data for name, data in members.items()})
        return self.upload_dataset(zip_bytes(content))


@dataclass(frozen=True)
class Case:
    """One bad input: how to send it and what the answer must say."""

    send: Callable[[Service], httpx.Response]
    status: int
    problem: str  # the slug of urn:camres:problem:<slug>
    message: str  # must appear in the detail (and in the field's message)
    field: str | None = None


def _torch_save_file(service: Service) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(3, 4)}, buffer)
    return buffer.getvalue()


def _plain_safetensors(service: Service) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"fc.weight": torch.zeros(3, 4)})


def _pickle_upload(service: Service) -> httpx.Response:
    marker = service.scratch / "pickle-was-executed"
    response = service.upload_model(executable_pickle(marker), "model.pt")
    assert not marker.exists(), "the uploaded pickle was loaded"
    return response


# fmt: off
CASES: dict[str, Case] = {
    # --- images of a cam job -------------------------------------------------------------------
    "non-image file as an image": Case(
        lambda s: s.cam(("notes.jpg", b"plain text, not an image")),
        422, "invalid-image", "not a JPEG/PNG/TIFF/BMP/WEBP image", "images[0]",
    ),
    "truncated JPEG": Case(
        lambda s: s.cam(("ok.jpg", s.jpeg), ("cut.jpg", s.jpeg[: len(s.jpeg) // 3])),
        422, "invalid-image", "'cut.jpg': corrupt or truncated", "images[1]",
    ),
    "truncated TIFF": Case(
        lambda s: s.cam(("cut.tif", s.tif[: len(s.tif) // 2])),
        422, "invalid-image", "'cut.tif': corrupt or truncated", "images[0]",
    ),
    "zero-byte image": Case(
        lambda s: s.cam(("empty.jpg", b"")),
        422, "invalid-image", "it is empty (0 bytes)", "images[0]",
    ),
    "image over the pixel limit": Case(
        lambda s: s.cam(("huge.png", png_header_only(9000, 8000))),
        422, "invalid-image", "9000×8000 = 72,000,000 pixels, over the limit of 64,000,000",
        "images[0]",
    ),
    "decompression bomb": Case(
        lambda s: s.cam(("bomb.png", png_header_only(100_000, 100_000))),
        422, "invalid-image", "'bomb.png' is too large", "images[0]",
    ),
    "too many images": Case(
        lambda s: s.cam(*[(f"{i}.jpg", s.jpeg) for i in range(5)]),
        422, "invalid-reference", "at most 4 images per job", "images",
    ),
    "job upload over the size limit": Case(
        lambda s: s.cam(("big.jpg", b"\xff" * (2 * MiB))),
        413, "content-too-large", "request body exceeds the limit of",
    ),
    # --- the job specification -------------------------------------------------------------------
    "broken multipart framing": Case(
        lambda s: s.client.post(
            "/v1/jobs", content=b"--x\r\n[]--x--\r\n",
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        400, "malformed-body", "Invalid multipart data",
    ),
    "missing spec": Case(
        lambda s: s.client.post("/v1/jobs", files=[("images", ("a.jpg", s.jpeg))]),
        422, "validation-error", "Field required", "spec",
    ),
    "malformed spec JSON": Case(
        lambda s: s.submit('{"kind": "damage", "model": '),
        422, "validation-error", "Invalid JSON", "spec",
    ),
    "damage fraction 0": Case(
        lambda s: s.damage(fraction=0), 422, "validation-error", "greater than 0",
        "spec.damage.fraction",
    ),
    "damage fraction negative": Case(
        lambda s: s.damage(fraction=-0.25), 422, "validation-error", "greater than 0",
        "spec.damage.fraction",
    ),
    "damage fraction above 1": Case(
        lambda s: s.damage(fraction=1.5), 422, "validation-error", "less than or equal to 1",
        "spec.damage.fraction",
    ),
    "damage fraction NaN": Case(
        lambda s: s.submit(json.dumps({"kind": "damage", "model": s.model,
                                       "damage": {"fraction": float("nan")}})),
        422, "validation-error", "NaN is not valid JSON", "spec",
    ),
    "unknown damage target": Case(
        lambda s: s.damage(fraction=0.1, targets=["D4", "layer9.*"]),
        422, "invalid-reference", "damage target 'layer9.*' matches no module",
        "spec.damage.targets",
    ),
    "damage target without weights": Case(
        lambda s: s.submit(
            {"kind": "cam", "model": s.model, "damage": {"fraction": 0.1, "targets": ["layer4"]}},
            [("a.jpg", s.jpeg)],
        ),
        422, "invalid-reference", "matches module 'layer4', which has no weight",
        "spec.damage.targets",
    ),
    "unknown job kind": Case(
        lambda s: s.submit({"kind": "paint", "model": s.model}),
        422, "validation-error", "does not match any of the expected tags", "spec.kind",
    ),
    "unknown architecture to train": Case(
        lambda s: s.submit({"kind": "train", "dataset": "ds-" + "0" * 32, "arch": "resnet9000"}),
        422, "invalid-reference", "unknown architecture 'resnet9000'", "spec.arch",
    ),
    # --- ids -------------------------------------------------------------------------------------
    "unknown model id in a job": Case(
        lambda s: s.submit({"kind": "damage", "model": "sha256:" + "0" * 64,
                            "damage": {"fraction": 0.1}}),
        422, "invalid-reference", "no model with id 'sha256:0000", "spec.model",
    ),
    "unknown dataset id in a job": Case(
        lambda s: s.submit({"kind": "evaluate", "model": s.model, "dataset": "ds-nope"}),
        422, "invalid-reference", "no dataset with id 'ds-nope'", "spec.dataset",
    ),
    "unknown model id": Case(
        lambda s: s.client.get("/v1/models/sha256:" + "1" * 64),
        404, "not-found", "no model with id 'sha256:1111",
    ),
    "unknown dataset id": Case(
        lambda s: s.client.delete("/v1/datasets/ds-" + "2" * 32),
        404, "not-found", "no dataset with id 'ds-2222",
    ),
    "unknown job id": Case(
        lambda s: s.client.post("/v1/jobs/0123456789abcdef/cancel"),
        404, "not-found", "no job with id '0123456789abcdef'",
    ),
    # --- checkpoints ---------------------------------------------------------------------------
    "file that is not a checkpoint": Case(
        lambda s: s.upload_model(b"definitely not a safetensors file"),
        422, "checkpoint", "not a safetensors file", "file",
    ),
    "empty checkpoint file": Case(
        lambda s: s.upload_model(b""), 422, "invalid-request", "the uploaded file is empty",
        "file",
    ),
    "checkpoint with a pickle payload (never executed)": Case(
        _pickle_upload, 422, "checkpoint", "camres never unpickles", "file",
    ),
    "torch.save() file": Case(
        lambda s: s.upload_model(_torch_save_file(s), "model.pt"),
        422, "checkpoint", "looks like a zip archive", "file",
    ),
    "safetensors file without camres metadata": Case(
        lambda s: s.upload_model(_plain_safetensors(s)),
        422, "checkpoint", "without camres metadata", "file",
    ),
    "checkpoint whose classes contradict its weights": Case(
        lambda s: s.upload_model(rewrite_meta(s.checkpoint, classes=["a", "b", "c", "d", "e"])),
        422, "checkpoint", "fc.weight has 3 outputs but the metadata lists 5 classes", "file",
    ),
    "checkpoint whose architecture contradicts its weights": Case(
        lambda s: s.upload_model(rewrite_meta(s.checkpoint, arch="resnet50")),
        422, "checkpoint", "not those of a resnet50 with 3 classes (names or shapes differ; "
        "they are those of a resnet18)", "file",
    ),
    "checkpoint of an unknown architecture": Case(
        lambda s: s.upload_model(rewrite_meta(s.checkpoint, arch="resnet9000")),
        422, "checkpoint", "unknown architecture 'resnet9000'", "file",
    ),
    # --- dataset archives ------------------------------------------------------------------------
    "zip with a ../ entry": Case(
        lambda s: s.dataset_of(**{"..__evil.jpg": b"x"}),
        422, "dataset", "archive member '../evil.jpg' points outside the archive", "file",
    ),
    "zip with an absolute path": Case(
        lambda s: s.upload_dataset(zip_bytes({"a/x.jpg": b"1", "/etc/evil.jpg": b"2"})),
        422, "dataset", "'/etc/evil.jpg' has an absolute or non-portable path", "file",
    ),
    "zip with a Windows path": Case(
        lambda s: s.upload_dataset(zip_bytes({"a/x.jpg": b"1", "a\\..\\evil.jpg": b"2"})),
        422, "dataset", "has an absolute or non-portable path", "file",
    ),
    "zip with a symbolic link": Case(
        lambda s: s.upload_dataset(zip_bytes({"a/x.jpg": b"1"}, symlinks={"b/l.jpg": "/etc"})),
        422, "dataset", "'b/l.jpg' is a symbolic link", "file",
    ),
    "zip bomb": Case(
        lambda s: s.upload_dataset(zip_bytes({"a/x.jpg": b"\0" * 10_000_000, "b/y.jpg": b"\0"})),
        422, "dataset", "the archive inflates to 10,000,001 bytes, over the limit of 4,194,304",
        "file",
    ),
    "zip with too many files": Case(
        lambda s: s.upload_dataset(zip_bytes({f"c{i % 2}/{i}.jpg": b"x" for i in range(21)})),
        422, "dataset", "the archive holds 21 files, over the limit of 20", "file",
    ),
    "dataset with one class": Case(
        lambda s: s.dataset_of(),
        422, "dataset", "found 1 class(es) (beach) in the archive; a classifier needs at least 2",
        "file",
    ),
    "dataset with an empty class": Case(
        lambda s: s.dataset_of(forest__README=b"no images here"),
        422, "dataset", "class folder 'forest' contains no images", "file",
    ),
    "dataset with a corrupt image": Case(
        lambda s: s.dataset_of(**{"forest__a.jpg": b"this is not a JPEG"}),
        422, "dataset", "'forest/a.jpg' is not a readable image", "file",
    ),
    "dataset upload over the size limit": Case(
        lambda s: s.upload_dataset(b"PK" + b"\0" * (3 * MiB)),
        413, "content-too-large", "request body exceeds the limit of 2,097,152 bytes",
    ),
    "dataset that is not a zip": Case(
        lambda s: s.upload_dataset(s.jpeg, "beach.jpg"),
        415, "unsupported-media-type", "the file is not a zip archive",
    ),
    # --- artifact names --------------------------------------------------------------------------
    "artifact name with ../": Case(
        lambda s: s.client.get(f"/v1/jobs/{s.job}/artifacts/..%2F..%2Fcamres.sqlite3"),
        400, "invalid-request", "no '/' or '..'", "name",
    ),
    "artifact name with a folder": Case(
        lambda s: s.client.get(f"/v1/jobs/{s.job}/artifacts/a/b.png"),
        400, "invalid-request", "no '/' or '..'", "name",
    ),
    "hidden artifact name": Case(
        lambda s: s.client.get(f"/v1/jobs/{s.job}/artifacts/.hidden"),
        400, "invalid-request", "is not an artifact name", "name",
    ),
}
# fmt: on


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    ucm_dir: Path,
    ucm_tif_dir: Path,
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("bad-input")
    settings = Settings(
        data_dir=root / "var",
        max_images_per_job=4,
        max_job_upload_bytes=1 * MiB,
        max_dataset_bytes=2 * MiB,
        max_dataset_files=20,
        max_dataset_uncompressed_bytes=4 * MiB,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        checkpoint = tiny_checkpoint.read_bytes()
        model = client.post("/v1/models", files={"file": ("tiny.safetensors", checkpoint)})
        assert model.status_code == 201, model.text
        service = Service(
            client=client,
            settings=settings,
            model=model.json()["id"],
            job="",
            checkpoint=checkpoint,
            ucm_dir=ucm_dir,
            tif=sorted(ucm_tif_dir.glob("*.tif"))[0].read_bytes(),
            scratch=root,
        )
        job = service.cam(("airplane00.jpg", service.jpeg))
        assert job.status_code == 202, job.text
        service.job = job.json()["id"]
        yield service
    app.state.camres.close()


def stored(service: Service) -> dict[str, Any]:
    """Everything a refused request must leave unchanged."""
    settings, client = service.settings, service.client
    return {
        "jobs": [j["id"] for j in client.get("/v1/jobs").json()["items"]],
        "models": [m["id"] for m in client.get("/v1/models").json()["items"]],
        "datasets": client.get("/v1/datasets").json()["items"],
        "uploads": sorted(p.name for p in settings.uploads_dir.iterdir()),
        "tmp": sorted(p.name for p in settings.tmp_dir.iterdir()),
        "messages": len(list((settings.broker_dir / "queue").glob("*.msg"))),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_precisely(service: Service, name: str) -> None:
    case = CASES[name]
    before = stored(service)
    response = case.send(service)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == case.status
    assert problem["type"] == f"urn:camres:problem:{case.problem}"
    assert case.message in problem["detail"], problem["detail"]
    if case.field is not None:
        fields = {error["field"]: error["message"] for error in problem["errors"]}
        assert case.field in fields, fields
        assert case.message in fields[case.field] or case.message in problem["detail"]
    # The service keeps serving and has stored nothing.
    assert service.client.get("/healthz").json() == {"status": "ok"}
    assert stored(service) == before
    assert service.client.get(f"/v1/jobs/{service.job}").json()["status"] == "queued"


def _grey(image: Image.Image) -> bytes:
    return _png(image.convert("L"))


def _rgba(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    return _png(rgba)


def _sixteen_bit(image: Image.Image) -> bytes:
    values = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return _png(Image.fromarray(values))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "make", "mode"),
    [("1-channel", _grey, "L"), ("4-channel", _rgba, "RGBA"), ("16-bit", _sixteen_bit, "I;16")],
)
def test_unusual_images_are_converted_to_rgb(
    service: Service, kind: str, make: Callable[[Image.Image], bytes], mode: str
) -> None:
    with Image.open(io.BytesIO(service.jpeg)) as original:
        data = make(original)
        size = original.size
    with Image.open(io.BytesIO(data)) as sent:
        assert sent.mode == mode  # the test sends what it claims to
    response = service.cam((f"{kind}.png", data))
    assert response.status_code == 202, response.text
    job = response.json()["id"]
    manifest = json.loads((service.settings.uploads_dir / job / "manifest.json").read_text())
    [entry] = manifest["images"]
    converted = decode_image(service.settings.uploads_dir / job / entry["file"])
    assert (converted.mode, converted.size) == ("RGB", size)
    assert service.client.post(f"/v1/jobs/{job}/cancel").status_code == 202
