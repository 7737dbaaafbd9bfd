"""Fixtures of the worker tests (shared helpers live in tests/service/support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import get_settings
from tests.service.support import redis_prefix, redis_url, tiny_checkpoint, ucm_image
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
