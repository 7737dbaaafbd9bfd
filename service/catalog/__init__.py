"""Models and datasets on the shared data volume (torch-free; used by gateway and workers)."""

from __future__ import annotations

from service.catalog.archive import ArchiveLimits
from service.catalog.datasets import DatasetCatalog, DatasetInfo
from service.catalog.models import ModelCatalog, ModelInfo
from service.settings import Settings

__all__ = [
    "ArchiveLimits",
    "DatasetCatalog",
    "DatasetInfo",
    "ModelCatalog",
    "ModelInfo",
    "dataset_catalog",
    "model_catalog",
]


def model_catalog(settings: Settings) -> ModelCatalog:
    """The model catalog of a deployment."""
    return ModelCatalog(settings.models_dir, settings.tmp_dir, settings.builtin_models)


def dataset_catalog(settings: Settings) -> DatasetCatalog:
    """The dataset catalog of a deployment."""
    return DatasetCatalog(settings.datasets_dir, settings.tmp_dir)
