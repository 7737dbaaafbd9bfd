"""Request and response models of the REST API (``/v1``). Torch-free.

Job specifications reuse the core's own request models (:class:`core.cam_options.CamOptions`,
:class:`core.damage_spec.DamageSpec`, :class:`core.train_spec.TrainConfig`), so the gateway
refuses exactly what the engine would refuse, before a job is queued.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from core.cam_options import CamOptions
from core.damage_spec import DamageSpec
from core.results import ImageCam
from core.sweep_spec import SummaryRow, SweepConfig
from core.train_spec import Evaluation, TrainConfig
from core.transfer_spec import TransferSummary
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


class UnseenClasses(BaseModel):
    """Classes only one of the two datasets has (the paper's "previously unseen" classes)."""

    model_config = _STRICT

    ucm: list[str] = Field(default_factory=list)
    aid: list[str] = Field(default_factory=list)


class ClassMappingSpec(BaseModel):
    """The UC Merced ↔ AID class correspondence, in the format of ``ucm_aid_classes.json``.

    It offers the attributes of :class:`core.datasets.ClassMapping` that
    :func:`core.transfer_spec.plan_transfer` reads, so the gateway plans a transfer without
    importing that (torch-bound) module.
    """

    model_config = _STRICT

    ucm_to_aid: dict[str, str] = Field(
        min_length=1, description="Shared classes: UC Merced name → AID name."
    )
    unseen: UnseenClasses = Field(default_factory=UnseenClasses)

    @field_validator("ucm_to_aid")
    @classmethod
    def _one_to_one(cls, value: dict[str, str]) -> dict[str, str]:
        if len(set(value.values())) != len(value):
            raise ValueError("two UC Merced classes map to the same AID class")
        return value

    @property
    def aid_to_ucm(self) -> dict[str, str]:
        return {aid: ucm for ucm, aid in self.ucm_to_aid.items()}

    @property
    def unseen_ucm(self) -> tuple[str, ...]:
        return tuple(self.unseen.ucm)

    @property
    def unseen_aid(self) -> tuple[str, ...]:
        return tuple(self.unseen.aid)


class TransferJobSpec(BaseModel):
    """Cross-dataset transfer (paper §4.1, Figures 3–4): test a model trained on UC Merced on
    an AID dataset (or the other way round) through the class mapping, CAMs of sample images
    of shared and unseen classes, and optionally fine-tuning on the target dataset (the
    fine-tuned network becomes a new model)."""

    model_config = _STRICT

    kind: Literal["transfer"]
    model: str
    dataset: str = Field(description="The target dataset: images of the other dataset.")
    mapping: ClassMappingSpec
    fine_tune: TrainConfig | None = Field(
        default=None,
        description="Fine-tune on the target dataset (init must stay scratch: training starts "
        "from the model; test_fraction > 0: before and after are compared on held-out images).",
    )
    samples_per_class: int = Field(
        default=1, ge=1, le=100, description="Sample images with CAMs per shared/unseen class."
    )
    cam: CamOptions = Field(
        default_factory=CamOptions,
        description="Each network explains its own top classes: classes must stay unset.",
    )


class SweepJobSpec(BaseModel):
    """Damage sweep (paper §4.2): accuracy and CAM drift of the model damaged at each location
    and fraction, over several trials, optionally after masked retraining. Rows appear in the
    ``sweep_cells.jsonl`` artifact as cells finish (``sweep_cells.<part>.jsonl`` per part when
    the sweep is split across workers)."""

    model_config = _STRICT

    kind: Literal["sweep"]
    model: str
    dataset: str = Field(description="Evaluation images (and retraining images, if any).")
    config: SweepConfig = Field(default_factory=SweepConfig)
    mapping: dict[str, str] | None = Field(
        default=None,
        description="Dataset class name → model class name, for a dataset that names classes "
        "differently; default: match names (other classes are skipped).",
    )
    split: Literal["all", "test"] = Field(
        default="all",
        description="test: only the images the model's training held out of this dataset.",
    )
    limit: int | None = Field(
        default=None, ge=1, le=1_000_000, description="At most N images, balanced over classes."
    )

    @field_validator("mapping")
    @classmethod
    def _non_empty_mapping(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError("must not be empty (omit it to match class names)")
        return value


AnyJobSpec = (
    CamJobSpec
    | DamageJobSpec
    | RetrainJobSpec
    | TrainJobSpec
    | EvaluateJobSpec
    | TransferJobSpec
    | SweepJobSpec
)


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


class TransferJobResult(BaseModel):
    """Result of a transfer job: the experiment's report (artifact names resolve under the
    job's artifacts route; ``target_root`` is the dataset id, sample paths are relative to
    it) and, after fine-tuning, the fine-tuned model."""

    model: str | None = Field(
        default=None, description="Id of the fine-tuned model (GET /v1/models/{id})."
    )
    report: TransferSummary


class SweepPart(BaseModel):
    """One part of a sweep split across workers: the cells it computed and where."""

    part: str = Field(description="Part name, p0, p1, ….")
    worker: str = Field(description="Hostname of the worker that computed it.")
    locations: list[str]
    fractions: list[float]
    cells: int
    seconds: float


class SweepJobResult(BaseModel):
    """Result of a sweep job: its headline numbers and the summary table (mean and confidence
    interval over trials per location and fraction). Every cell's row is in the artifacts
    (``sweep.json``, ``sweep_cells.csv``, ``sweep_cells.jsonl``; while a sweep split across
    workers runs, each part writes its rows to ``sweep_cells.<part>.jsonl``)."""

    arch: str
    classes: list[str]
    images: int
    intact_accuracy: float
    cells: int = Field(description="Damaged networks evaluated.")
    seconds: float
    summary: list[SummaryRow]
    artifacts: dict[str, str] = Field(description="Artifact kind → file name.")
    parts: list[SweepPart] | None = Field(
        default=None,
        description="The parts the sweep was split into across workers; absent when it ran whole.",
    )


#: What ``Job.result`` may hold, by kind. Results carry no tag and several models accept one
#: another's documents (a TransferJobResult is also a valid ModelJobResult), so the stored
#: document is served as is (the plain object comes first, left to right) and the models
#: document its shape per kind.
JobResult = Annotated[
    dict[str, Any]
    | CamResult
    | ModelJobResult
    | Evaluation
    | TransferJobResult
    | SweepJobResult
    | None,
    Field(union_mode="left_to_right"),
]


class JobLinks(BaseModel):
    self: str
    artifacts: str


class Job(BaseModel):
    """A job and its state. ``result`` (once succeeded) depends on the kind: CamResult for
    cam, ModelJobResult for damage/retrain/train, Evaluation for evaluate, TransferJobResult
    for transfer, SweepJobResult for sweep."""

    id: str
    kind: str
    status: JobStatus
    progress: JobProgress
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any]
    result: JobResult = None
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
