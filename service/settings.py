"""Typed settings of the gateway and the workers, read from ``CAMRES_*`` environment variables.

One module for both processes, so a worker and the gateway started with the same environment
agree on the broker, the job store and the shared data folder. Torch-free and FastAPI-free.

Deployment shapes:

* embedded (default): no ``CAMRES_BROKER_URL``; the Celery broker is kombu's filesystem
  transport under ``data_dir/broker`` and jobs live in a SQLite file under ``data_dir``;
* scale-out: ``CAMRES_BROKER_URL=redis://host:6379/0``; jobs live in the same Redis (under
  ``redis_prefix``) and ``data_dir`` is a volume shared by the gateway and every worker.

Access control is off until API keys are configured (``CAMRES_API_KEYS``, ``CAMRES_ADMIN_KEYS``):
the embedded default is meant for one user on their own machine. With keys, every request to
``/v1`` needs one, and each owner sees only their own models, datasets and jobs.
"""

from __future__ import annotations

import json
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: URL scheme of the embedded broker (kombu's filesystem transport, made atomic by
#: :mod:`service.broker`, which registers it).
EMBEDDED_BROKER_SCHEME = "camresfs"

MiB = 1024 * 1024
DAY = 24 * 3600

#: Owner names: they name folders on the shared volume and appear in job records.
OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Shorter keys are refused: an API key is the only secret between a client and its data.
MIN_KEY_LENGTH = 16
#: Owner of an admin key given without one.
DEFAULT_ADMIN_OWNER = "admin"

JobKind = Literal["cam", "damage", "retrain", "train", "evaluate", "transfer", "sweep"]
JOB_KINDS: tuple[JobKind, ...] = typing.get_args(JobKind)


def _default_cpu_kinds() -> list[JobKind]:
    # Damage injection is a few tensor writes; everything else wants the accelerator.
    return ["damage"]


def parse_keys(value: Any, default_owner: str | None) -> dict[str, str]:
    """API keys from the environment: a JSON object ``{"<key>": "<owner>"}`` or the CSV
    ``<key>:<owner>,<key>:<owner>``. ``default_owner`` is the owner of a bare ``<key>`` (None:
    an owner is required)."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, str) and value.strip().startswith(("{", "[")):
        parsed = json.loads(value)
        if not isinstance(parsed, dict):
            raise ValueError("API keys must be a JSON object or '<key>:<owner>,...'")
        pairs = list(parsed.items())
    elif isinstance(value, str):
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, owner = item.partition(":")
            pairs.append((key.strip(), owner.strip() if sep else default_owner))
    else:
        raise ValueError("API keys must be a JSON object or '<key>:<owner>,...'")
    keys: dict[str, str] = {}
    for key, owner in pairs:
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or key != key.strip():
            raise ValueError(f"an API key must be at least {MIN_KEY_LENGTH} characters")
        if owner is None:
            raise ValueError("every API key needs an owner: '<key>:<owner>'")
        if not isinstance(owner, str) or not OWNER_NAME.match(owner):
            raise ValueError(
                f"owner {owner!r} must be 1–64 letters, digits, '_', '.' or '-' (first: a "
                "letter or digit)"
            )
        keys[key] = owner
    return keys


class Settings(BaseSettings):
    """Everything a deployment may tune. Paths are resolved against the working directory."""

    # Errors must not echo values: API keys are among them.
    model_config = SettingsConfigDict(
        env_prefix="CAMRES_", extra="ignore", hide_input_in_errors=True
    )

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

    # --- access control ----------------------------------------------------------------------
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,
        description='Client keys → owner: JSON {"<key>": "<owner>"} or "<key>:<owner>,...".',
    )
    admin_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,
        description="Keys that see every owner's resources (same format; owner optional).",
    )

    # --- upload limits -----------------------------------------------------------------------
    max_request_bytes: int = Field(default=1 * MiB, ge=1, description="Non-upload bodies.")
    max_model_bytes: int = Field(default=1024 * MiB, ge=1)
    max_dataset_bytes: int = Field(default=2048 * MiB, ge=1, description="Zip upload size.")
    max_dataset_files: int = Field(default=50_000, ge=1)
    max_dataset_uncompressed_bytes: int = Field(default=8192 * MiB, ge=1)
    max_job_upload_bytes: int = Field(default=128 * MiB, ge=1, description="All job images.")
    max_images_per_job: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)

    # --- jobs --------------------------------------------------------------------------------
    max_active_jobs: int = Field(
        default=50, ge=1, description="Queued + running jobs per owner; beyond: 429."
    )
    busy_retry_after: int = Field(default=10, ge=1, description="Retry-After of a 429, seconds.")
    max_attempts: int = Field(
        default=3, ge=1, description="Runs of a job whose worker dies before it is failed."
    )
    result_ttl: int = Field(
        default=7 * DAY,
        ge=0,
        description="Seconds a finished job and its artifacts are kept; 0: forever.",
    )
    retention_interval: float = Field(
        default=300.0, gt=0.0, description="Seconds between a worker's expiry sweeps."
    )

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
    # Sweep fan-out across workers (worker/sweep_fanout.py); only with a Redis broker.
    sweep_fanout: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default="auto",
        description='Parts a sweep job is split into when more than one worker is live: "auto" '
        "one per live worker on the sweep's queue, N at most N parts; 1 never splits.",
    )
    broker_polling_interval: float = Field(
        default=0.02,
        gt=0.0,
        le=5.0,
        description="Embedded (filesystem) broker: seconds between looks for a new task. A job "
        "waits half of it on average; an idle worker spends ~0.2 ms of CPU per look.",
    )
    # Micro-batching of one-image CAM jobs (worker/batching.py).
    cam_batching: bool = Field(
        default=True,
        description="Run small intact-only CAM jobs on one model in shared forward passes.",
    )
    cam_batch_wait_ms: float = Field(
        default=10.0,
        ge=0.0,
        le=10_000.0,
        description="How long a worker waits for more CAM jobs to join a batch; a lone job's "
        "latency grows by at most this.",
    )
    cam_batch_max_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most one-image jobs, hence images, in one batched forward pass.",
    )
    broker_visibility_timeout: int | None = Field(
        default=None,
        ge=1,
        description="Redis: seconds before a task of a vanished worker is redelivered; "
        "default: the hard time limit + 10 min (it must outlast the longest task).",
    )

    # --- models ----------------------------------------------------------------------------------
    builtin_models: list[str] = Field(
        default_factory=lambda: ["resnet50:imagenet"],
        description='torchvision ImageNet models offered as "<arch>:imagenet".',
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _client_keys(cls, value: Any) -> dict[str, str]:
        return parse_keys(value, default_owner=None)

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _admin_keys(cls, value: Any) -> dict[str, str]:
        return parse_keys(value, default_owner=DEFAULT_ADMIN_OWNER)

    @model_validator(mode="after")
    def _distinct_keys(self) -> Settings:
        if self.api_keys.keys() & self.admin_keys.keys():
            raise ValueError("a key cannot be both a client key and an admin key")
        return self

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
    def auth_enabled(self) -> bool:
        """True when API keys are configured: then every ``/v1`` request needs one."""
        return bool(self.api_keys or self.admin_keys)

    @property
    def effective_visibility_timeout(self) -> int:
        return self.broker_visibility_timeout or self.task_time_limit + 600

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"{EMBEDDED_BROKER_SCHEME}://localhost/"

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

    @property
    def cam_batch_queue(self) -> str:
        """The queue of batchable CAM jobs, next to the one CAM jobs are routed to: workers
        consuming that one consume it too (worker/app.py)."""
        return f"{self.queue_for('cam')}-batch"

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
