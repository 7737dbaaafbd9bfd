"""Fixtures of the worker tests (shared helpers live in tests/service/support.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import get_settings
from tests.service.support import (
    TINY_CLASSES,
    redis_prefix,
    redis_url,
    tiny_checkpoint,
    ucm_image,
    ucm_images,
)
from worker import runtime

__all__ = ["redis_prefix", "redis_url", "tiny_checkpoint", "ucm_image"]


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[runtime.WorkerServices]:
    """Worker services on a fresh embedded data folder (as a worker process would see them)."""
    monkeypatch.setenv("CAMRES_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CAMRES_PROGRESS_INTERVAL", "3600")
    monkeypatch.setenv("CAMRES_CANCEL_POLL_INTERVAL", "0")
    monkeypatch.setattr(runtime, "_device", None)
    get_settings.cache_clear()
    runtime.services.cache_clear()
    runtime.model_cache.cache_clear()
    yield runtime.services()
    runtime.services().store.close()
    get_settings.cache_clear()
    runtime.services.cache_clear()
    runtime.model_cache.cache_clear()


def stored_model(svc: runtime.WorkerServices, checkpoint: Path) -> str:
    copy = svc.models.new_tmp_path()
    shutil.copyfile(checkpoint, copy)
    return svc.models.add(copy)[0].id


@pytest.fixture
def model_id(svc: runtime.WorkerServices, tiny_checkpoint: Path) -> str:
    return stored_model(svc, tiny_checkpoint)


@pytest.fixture
def dataset_id(svc: runtime.WorkerServices, ucm_dir: Path, tmp_path: Path) -> str:
    """Two real UC Merced images of each of the tiny model's classes."""
    folder = tmp_path / "shared" / "ucm3"
    for cls, paths in ucm_images(ucm_dir, TINY_CLASSES, 2).items():
        (folder / cls).mkdir(parents=True)
        for path in paths:
            shutil.copyfile(path, folder / cls / path.name)
    return svc.datasets.register(folder, "ucm3", max_pixels=10**8).id
