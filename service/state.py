"""What a gateway instance holds for its lifetime: settings, job store, catalogs, the Celery
producer, the metrics registry, the API keys and the long-polling watcher. Built once per app by
:func:`service.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from service.auth import KeyRing
from service.catalog import DatasetCatalog, ModelCatalog, dataset_catalog, model_catalog
from service.metrics import GatewayMetrics
from service.queue import make_celery
from service.settings import Settings
from service.store import JobStore, open_store
from service.watcher import JobWatcher


@dataclass
class ServiceState:
    settings: Settings
    store: JobStore
    models: ModelCatalog
    datasets: DatasetCatalog
    celery: Celery
    metrics: GatewayMetrics
    keys: KeyRing
    watcher: JobWatcher

    @classmethod
    def create(cls, settings: Settings) -> ServiceState:
        settings.ensure_dirs()
        store = open_store(settings)
        return cls(
            settings=settings,
            store=store,
            models=model_catalog(settings),
            datasets=dataset_catalog(settings),
            celery=make_celery(settings),
            metrics=GatewayMetrics.create(store),
            keys=KeyRing(settings),
            watcher=JobWatcher(store),
        )

    def close(self) -> None:
        self.store.close()
        self.celery.close()
