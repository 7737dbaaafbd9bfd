"""The camres gateway: ``uvicorn --factory service.app:create_app``.

It validates requests, stores uploads, records jobs and queues them for the workers; it never
imports torch (the heavy lifting is in ``worker``), so it starts fast and stays small.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.limits import BodySizeLimitMiddleware, LimitFor
from service.metrics import MetricsMiddleware
from service.problems import install_problem_handlers
from service.routers import datasets, health, jobs, models
from service.settings import Settings, get_settings
from service.state import ServiceState

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"

DESCRIPTION = """\
Class Activation Maps (CAM, Zhou et al. 2016; Eq. 1 of Vasu & Savakis) of image classifiers,
and how they hold up when the network's weights are damaged and after masked retraining.

Long computations are **jobs**: `POST /v1/jobs` answers `202` with a `Location` to poll;
results and downloadable artifacts appear when the job's status is `succeeded`. Every error is
an `application/problem+json` document (RFC 9457) whose `errors` name the fields at fault.

When the server has API keys configured, every `/v1` request sends one in the `X-API-Key`
header (or as `Authorization: Bearer <key>`), and each key sees only its owner's models,
datasets and jobs; without keys (the default of a local installation) everything is shared.
"""


def _limit_for(settings: Settings) -> LimitFor:
    """Per-route body limits: uploads get theirs, every other body a small default."""
    uploads = {
        "/v1/models": settings.max_model_bytes,
        "/v1/datasets": settings.max_dataset_bytes,
        # The spec and multipart framing ride along with the images.
        "/v1/jobs": settings.max_job_upload_bytes + settings.max_request_bytes,
    }

    def limit_for(method: str, path: str) -> int:
        if method == "POST":
            return uploads.get(path.rstrip("/"), settings.max_request_bytes)
        return settings.max_request_bytes

    return limit_for


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build a gateway for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    state = ServiceState.create(settings)
    if not settings.auth_enabled:
        log.info("no API keys configured: access control is off (every client sees everything)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.watcher.close()
        state.close()

    app = FastAPI(
        title="camres",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.camres = state
    install_problem_handlers(app, tagged_unions={("body", "spec"): "kind"})
    for router in (health.router, models.router, datasets.router, jobs.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimitMiddleware, limit_for=_limit_for(settings))
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
