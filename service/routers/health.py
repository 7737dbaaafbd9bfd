"""Liveness, readiness and metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import CeleryDep, MetricsDep, SettingsDep, StoreDep
from service.problems import ApiError, problem_responses
from service.queue import broker_reachable
from service.schemas import Health, Readiness
from service.store import JobStore, StoreError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_health() -> Health:
    """The process is up (liveness): no dependency is checked."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def read_readiness(settings: SettingsDep, store: StoreDep, celery: CeleryDep) -> Readiness:
    """Ready when the job store and the broker answer and a worker beat recently."""
    checks: dict[str, str] = {}
    ready = True
    try:
        store.ping()
        checks["store"] = "ok"
    except StoreError as exc:
        checks["store"], ready = str(exc), False
    problem = broker_reachable(celery)
    if problem is None and settings.embedded and not (settings.broker_dir / "queue").is_dir():
        problem = f"broker folder {settings.broker_dir / 'queue'} is missing"
    checks["broker"], ready = ("ok", ready) if problem is None else (problem, False)
    checks["worker"], worker_ok = _worker_check(store, settings.heartbeat_max_age)
    ready = ready and worker_ok
    if not ready:
        raise ApiError(
            503,
            "not ready: " + "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
            problem="not-ready",
            extra={"checks": checks},
        )
    return Readiness(checks=checks)


def _worker_check(store: JobStore, max_age: float) -> tuple[str, bool]:
    """("ok", True) when some worker beat within ``max_age`` seconds, else why not."""
    try:
        beats = store.workers()
    except StoreError as exc:
        return str(exc), False
    now = time.time()
    alive = [beat for beat in beats if beat.age(now) <= max_age]
    if alive:
        return "ok", True
    if beats:
        return f"no heartbeat for {beats[0].age(now):.0f} s (limit {max_age:.0f} s)", False
    return "no worker has ever reported", False


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def read_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
