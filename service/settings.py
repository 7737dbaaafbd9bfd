"""Typed settings of the gateway and the workers, read from ``CAMRES_*`` environment variables.

One module for both processes, so a worker and the gateway started with the same environment
agree on the broker, the job store and the shared data folder. Torch-free and FastAPI-free.

Deployment shapes:

* embedded (default): no ``CAMRES_BROKER_URL``; the Celery broker is kombu's filesystem
  transport under ``data_dir/broker`` and jobs live in a SQLite file under ``data_dir``;
* scale-out: ``CAMRES_BROKER_URL=redis://host:6379/0``; jobs live in the same Redis (under
  ``redis_prefix``) and ``data_dir`` is a volume shared by the gateway and every worker.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024

JobKind = Literal["cam", "damage", "retrain", "train", "evaluate"]
JOB_KINDS: tuple[JobKind, ...] = ("cam", "damage", "retrain", "train", "evaluate")


def _default_cpu_kinds() -> list[JobKind]:
    # Damage injection is a few tensor writes; everything else wants the accelerator.
    return ["damage"]


class Settings(BaseSettings):
    """Everything a deployment may tune. Paths are resolved against the working directory."""

    model_config = SettingsConfigDict(env_prefix="CAMRES_", extra="ignore")

    # --- where things live ---------------------------------------------------------------
    data_dir: Path = Field(
        default=Path("var"), description="Models, datasets, artifacts, embedded broker and DB."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker; None: kombu filesystem under data_dir/broker."
    )
    store_url: str | None = Field(
        default=None,
        description="Job store: sqlite:///path or redis://…; None: follows the broker.",
    )
    redis_prefix: str = Field(default="camres", min_length=1, description="Redis key prefix.")

    # --- HTTP ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # --- upload limits -----------------------------------------------------------------------
    max_request_bytes: int = Field(default=1 * MiB, ge=1, description="Non-upload bodies.")
    max_model_bytes: int = Field(default=1024 * MiB, ge=1)
    max_dataset_bytes: int = Field(default=2048 * MiB, ge=1, description="Zip upload size.")
    max_dataset_files: int = Field(default=50_000, ge=1)
    max_dataset_uncompressed_bytes: int = Field(default=8192 * MiB, ge=1)
    max_job_upload_bytes: int = Field(default=128 * MiB, ge=1, description="All job images.")
    max_images_per_job: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)

    # --- datasets already on the shared store ------------------------------------------------
    allow_dataset_register: bool = False
    dataset_register_roots: list[Path] = Field(default_factory=list)

    # --- worker ---------------------------------------------------------------------------------
    gpu_queue: str = Field(default="gpu", pattern=r"^[A-Za-z0-9_-]+$")
    cpu_queue: str = Field(default="cpu", pattern=r"^[A-Za-z0-9_-]+$")
    cpu_kinds: list[JobKind] = Field(
        default_factory=_default_cpu_kinds,
        description="Job kinds routed to the CPU queue; the others go to the GPU queue.",
    )
    task_soft_time_limit: int = Field(default=6 * 3600, ge=1, description="Seconds.")
    task_time_limit: int = Field(default=6 * 3600 + 300, ge=1, description="Seconds.")
    worker_concurrency: int = Field(default=1, ge=1)
    worker_pool: Literal["prefork", "solo", "threads"] = "prefork"
    device: str = Field(default="auto", description='"auto", "cpu", "cuda" or "cuda:N".')
    model_cache_size: int = Field(default=2, ge=1, description="Models kept per worker process.")
    progress_interval: float = Field(default=0.5, ge=0.0, description="Seconds between writes.")
    cancel_poll_interval: float = Field(default=1.0, ge=0.0)
    heartbeat_interval: float = Field(default=5.0, gt=0.0)
    heartbeat_max_age: float = Field(default=30.0, gt=0.0, description="Readiness threshold.")
    broker_polling_interval: float = Field(default=0.2, gt=0.0, description="Filesystem broker.")

    # --- models ----------------------------------------------------------------------------------
    builtin_models: list[str] = Field(
        default_factory=lambda: ["resnet50:imagenet"],
        description='torchvision ImageNet models offered as "<arch>:imagenet".',
    )

    @field_validator("builtin_models")
    @classmethod
    def _builtin_names(cls, names: list[str]) -> list[str]:
        for name in names:
            arch, _, weights = name.partition(":")
            if not arch or weights != "imagenet":
                raise ValueError(f"built-in models are '<arch>:imagenet', not {name!r}")
        return names

    # --- derived locations -------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when no external broker is configured."""
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost/"

    @property
    def effective_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"sqlite:///{(self.data_dir / 'camres.sqlite3').resolve()}"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir.resolve() / "broker"

    @property
    def models_dir(self) -> Path:
        return self.data_dir.resolve() / "models"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir.resolve() / "datasets"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir.resolve() / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        """Inputs of queued jobs (uploaded images), one folder per job."""
        return self.data_dir.resolve() / "uploads"

    @property
    def tmp_dir(self) -> Path:
        """Scratch space on the same filesystem as the stores, so finished files are renamed
        into place atomically."""
        return self.data_dir.resolve() / "tmp"

    def queue_for(self, kind: str) -> str:
        """The Celery queue a job kind is routed to."""
        return self.cpu_queue if kind in self.cpu_kinds else self.gpu_queue

    def ensure_dirs(self) -> None:
        """Create the data folders (idempotent)."""
        for path in (
            self.models_dir,
            self.datasets_dir,
            self.artifacts_dir,
            self.uploads_dir,
            self.tmp_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        if self.embedded:
            for sub in ("queue", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
