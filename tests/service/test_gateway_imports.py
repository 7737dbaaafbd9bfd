"""The gateway never imports torch, even indirectly (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.support import REPO_ROOT, subprocess_env

SCRIPT = """
import sys, tempfile, warnings
warnings.simplefilter("ignore")
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

with tempfile.TemporaryDirectory() as tmp:
    app = create_app(Settings(data_dir=tmp))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/v1/models").status_code == 200
        checkpoint = open(sys.argv[1], "rb").read()
        upload = client.post("/v1/models", files={"file": ("m.safetensors", checkpoint)})
        assert upload.status_code == 201, upload.text
        image = open(sys.argv[2], "rb").read()
        spec = '{"kind": "cam", "model": "%s", "damage": {"fraction": 0.5}}' % upload.json()["id"]
        job = client.post("/v1/jobs", files=[("spec", (None, spec)), ("images", ("a.jpg", image))])
        assert job.status_code == 202, job.text
        assert client.get("/v1/jobs/" + job.json()["id"]).status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    import service.openapi, cli.serve  # the CLI module of `serve` too
heavy = sorted(m for m in ("torch", "torchvision", "worker.tasks") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_the_gateway_does_not_import_torch(tiny_checkpoint: Path, ucm_image: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoint), str(ucm_image)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY:\n" in result.stdout, result.stdout
