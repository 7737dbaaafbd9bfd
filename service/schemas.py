"""Request and response models of the REST API (``/v1``). Torch-free.

Job specifications reuse the core's own request models (:class:`core.cam_options.CamOptions`,
:class:`core.damage_spec.DamageSpec`, :class:`core.train_spec.TrainConfig`), so the gateway
refuses exactly what the engine would refuse, before a job is queued.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from core.cam_options import CamOptions
from core.damage_spec import DamageSpec
from core.results import ImageCam
from core.train_spec import Evaluation, TrainConfig
from service.catalog import DatasetInfo, ModelInfo
from service.settings import OWNER_NAME
from service.store import JobError, JobProgress, JobRecord, JobStatus, utc

_STRICT = ConfigDict(extra="forbid")


# --- job specifications -----------------------------------------------------------------------
class DatasetImages(BaseModel):
    """Images of a cam job taken from a dataset instead of uploaded: the first ``limit`` images
    (by file name) of each class in ``classes`` (default: every class)."""

    model_config = _STRICT

    dataset: str
    classes: list[str] | None = Field(default=None, min_length=1)
    limit: int = Field(default=1, ge=1, le=10_000, description="Images per class.")


class RetrainStep(BaseModel):
    """Masked retraining of the damaged model (the paper's recovery step)."""

    model_config = _STRICT

    dataset: str
    config: TrainConfig = Field(default_factory=TrainConfig)


class CamJobSpec(BaseModel):
    """CAMs and HAR boxes of the images under the intact model and, with ``damage``, the
    damaged model and, with ``retrain``, the damaged model after masked retraining."""

    model_config = _STRICT

    kind: Literal["cam"]
    model: str
    images: DatasetImages | None = Field(
        default=None, description="Dataset images; without it, the uploaded `images` files."
    )
    cam: CamOptions = Field(default_factory=CamOptions)
    damage: DamageSpec | None = None
    retrain: RetrainStep | None = None


class DamageJobSpec(BaseModel):
    """Inject damage into a model; the result names the new (damaged) model."""

    model_config = _STRICT

    kind: Literal["damage"]
    model: str
    damage: DamageSpec


class RetrainJobSpec(BaseModel):
    """Masked retraining of a damaged model; the result names the retrained model."""

    model_config = _STRICT

    kind: Literal["retrain"]
    model: str
    dataset: str
    config: TrainConfig = Field(default_factory=TrainConfig)


class TrainJobSpec(BaseModel):
    """Train a classifier on a dataset; the result names the trained model. A
    ``config.init`` of kind ``checkpoint`` names a model id of this service."""

    model_config = _STRICT

    kind: Literal["train"]
    dataset: str
    arch: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Architecture (e.g. resnet50); default: that of config.init's checkpoint.",
    )
    config: TrainConfig = Field(default_factory=TrainConfig)
    classes: list[str] | None = Field(
        default=None, min_length=2, description="Train on these dataset classes only."
    )


class EvaluateJobSpec(BaseModel):
    """Accuracy, per-class accuracy and confusion matrix of a model on a dataset."""

    model_config = _STRICT

    kind: Literal["evaluate"]
    model: str
    dataset: str
    mapping: dict[str, str] | None = Field(
        default=None,
        description="Dataset class name → model class name, for cross-dataset evaluation "
        "(classes mapped to nothing are left out); default: match names.",
    )

    @model_validator(mode="after")
    def _non_empty_mapping(self) -> EvaluateJobSpec:
        if self.mapping is not None and not self.mapping:
            raise ValueError("mapping must not be empty (omit it to match class names)")
        return self


AnyJobSpec = CamJobSpec | DamageJobSpec | RetrainJobSpec | TrainJobSpec | EvaluateJobSpec


class JobSpec(RootModel[Annotated[AnyJobSpec, Field(discriminator="kind")]]):
    """A job specification, discriminated by ``kind``."""


# --- responses ----------------------------------------------------------------------------------
class ModelList(BaseModel):
    items: list[ModelInfo]


class DatasetList(BaseModel):
    items: list[DatasetInfo]


class DatasetRegistration(BaseModel):
    """A folder on the shared store to catalogue (admin; off unless enabled)."""

    model_config = _STRICT

    path: str = Field(min_length=1, max_length=4096, description="Absolute folder path.")
    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(
        default=None,
        pattern=OWNER_NAME.pattern,
        description="Owner to register it for (default: the admin's own).",
    )


class CamConditions(BaseModel):
    """One image under each model condition the job computed."""

    intact: ImageCam
    damaged: ImageCam | None = None
    retrained: ImageCam | None = None


class CamImageResult(BaseModel):
    image: str = Field(description="The image's name (uploaded file name, or class/file).")
    conditions: CamConditions


class CamResult(BaseModel):
    """Result of a cam job; artifact names in the ImageCams resolve under the job's
    artifacts route."""

    images: list[CamImageResult]
    damage: dict[str, Any] | None = Field(default=None, description="What was damaged.")
    retrain: dict[str, Any] | None = Field(default=None, description="How retraining went.")


class ModelJobResult(BaseModel):
    """Result of a damage, retrain or train job: the model it produced (stored in the
    catalog) and what the core reported about producing it."""

    model: str = Field(description="Id of the new model (GET /v1/models/{id}).")
    details: dict[str, Any] = Field(default_factory=dict)


JobResult = CamResult | ModelJobResult | Evaluation | dict[str, Any]


class JobLinks(BaseModel):
    self: str
    artifacts: str


class Job(BaseModel):
    """A job and its state. ``result`` (once succeeded) depends on the kind: CamResult for
    cam, ModelJobResult for damage/retrain/train, Evaluation for evaluate."""

    id: str
    kind: str
    status: JobStatus
    progress: JobProgress
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any]
    result: JobResult | None = None
    error: JobError | None = None
    attempts: int = Field(
        default=0, description="Times a worker started it (more than 1: its worker died)."
    )
    owner: str | None = Field(default=None, description="Who submitted it; null: unowned.")
    links: JobLinks

    @classmethod
    def from_record(cls, record: JobRecord, base: str = "/v1/jobs") -> Job:
        created = utc(record.created_at)
        assert created is not None
        return cls(
            id=record.id,
            kind=record.kind,
            status=record.status,
            progress=record.progress,
            created_at=created,
            started_at=utc(record.started_at),
            finished_at=utc(record.finished_at),
            spec=record.spec,
            result=record.result,
            error=record.error,
            attempts=record.attempts,
            owner=record.owner,
            links=JobLinks(self=f"{base}/{record.id}", artifacts=f"{base}/{record.id}/artifacts"),
        )


class JobList(BaseModel):
    items: list[Job]
    next_cursor: str | None = None


class Artifact(BaseModel):
    name: str
    size: int
    media_type: str
    url: str


class ArtifactList(BaseModel):
    items: list[Artifact]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, str]
