"""The committed OpenAPI document matches the code (regenerate: `make openapi`)."""

from __future__ import annotations

import json
from pathlib import Path

from cli.main import main
from service.openapi import openapi_document
from tests.service.support import REPO_ROOT

COMMITTED = REPO_ROOT / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_code() -> None:
    current = openapi_document()
    assert COMMITTED.is_file(), "openapi/openapi.json is missing; run `make openapi`"
    assert COMMITTED.read_text(encoding="utf-8") == current, (
        "openapi/openapi.json is out of date; run `make openapi` and commit the result"
    )


def test_the_document_covers_the_api() -> None:
    document = json.loads(openapi_document())
    paths = document["paths"]
    expected = {
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
        "/v1/models": {"get", "post"},
        "/v1/models/{model_id}": {"get", "delete"},
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/register": {"post"},
        "/v1/datasets/{dataset_id}": {"get", "delete"},
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/jobs/{job_id}/artifacts": {"get"},
        "/v1/jobs/{job_id}/artifacts/{name}": {"get"},
    }
    assert {path: set(ops) for path, ops in paths.items()} == expected
    schemas = document["components"]["schemas"]
    for name in ("CamJobSpec", "DamageSpec", "TrainConfig", "CamOptions", "ImageCam", "Problem"):
        assert name in schemas, name
    problem = paths["/v1/jobs"]["post"]["responses"]["422"]["content"]
    assert "application/problem+json" in problem


def test_export_openapi_command_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "openapi.json"
    main(["export-openapi", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == openapi_document()
