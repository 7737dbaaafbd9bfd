"""Fixtures of the gateway tests: an app on a fresh data folder, a client, real test data."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from tests.service.support import redis_prefix, redis_url, tiny_checkpoint, ucm_image

with warnings.catch_warnings():
    # Starlette nudges towards httpx2; the installed httpx is what the project pins.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

__all__ = ["redis_prefix", "redis_url", "tiny_checkpoint", "ucm_image"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings on a fresh data folder."""
    return Settings(data_dir=tmp_path / "var", broker_url=None, store_url=None)


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings)
    yield app
    app.state.camres.close()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def model_id(client: TestClient, tiny_checkpoint: Path) -> str:
    """The tiny checkpoint, uploaded."""
    response = client.post(
        "/v1/models", files={"file": ("tiny.safetensors", tiny_checkpoint.read_bytes())}
    )
    assert response.status_code == 201, response.text
    model: str = response.json()["id"]
    return model
