"""Prometheus metrics of the gateway (``GET /metrics``).

Request counts and latencies are labelled with the route *template* (``/v1/jobs/{job_id}``),
never the raw path, so the label set stays bounded. Job counts are read from the job store at
scrape time: jobs finish in worker processes, and the store is the one place that sees every
gateway's submissions and every worker's results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.store import TERMINAL, JobStore, StoreError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class JobStoreCollector(Collector):
    """Job counts by kind and status, and worker heartbeat ages, from the job store."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        finished = CounterMetricFamily(
            "camres_jobs_finished",
            "Jobs that reached a final status, by kind and status.",
            labels=["kind", "status"],
        )
        current = GaugeMetricFamily(
            "camres_jobs_active", "Jobs queued or running, by kind.", labels=["kind", "status"]
        )
        heartbeat = GaugeMetricFamily(
            "camres_worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat.",
            labels=["worker"],
        )
        try:
            counts = self.store.counts()
            workers = self.store.workers()
        except StoreError:
            return  # /readyz reports the store; a scrape must not fail on it
        for (kind, status), n in sorted(counts.items()):
            (finished if status in TERMINAL else current).add_metric([kind, status], n)
        now = time.time()
        for beat in workers:
            heartbeat.add_metric([beat.name], beat.age(now))
        yield from (finished, current, heartbeat)


@dataclass
class GatewayMetrics:
    """The gateway's metrics, in a registry of their own (one per app)."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    jobs_submitted: Counter

    @classmethod
    def create(cls, store: JobStore) -> GatewayMetrics:
        registry = CollectorRegistry()
        registry.register(JobStoreCollector(store))
        return cls(
            registry=registry,
            requests=Counter(
                "camres_http_requests",
                "HTTP requests by method, route template and status.",
                ["method", "route", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "camres_http_request_duration_seconds",
                "HTTP request latency by method and route template.",
                ["method", "route"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            jobs_submitted=Counter(
                "camres_jobs_submitted",
                "Jobs accepted by this gateway, by kind.",
                ["kind"],
                registry=registry,
            ),
        )


class MetricsMiddleware:
    """Count and time every HTTP request (pure ASGI: streaming responses are timed fully)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if _long_poll(scope):  # held on purpose: kept out of the answer-time histogram
                template += "?wait"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


def _long_poll(scope: Scope) -> bool:
    """Whether the request asked to be held (``?wait=`` > 0, see ``service.watcher``)."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("wait", [])
    try:
        return any(float(value) > 0 for value in values)
    except ValueError:
        return False
