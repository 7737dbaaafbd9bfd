"""Admission of a job: check what its spec refers to, store its uploaded images.

Everything a client can get wrong is found here, before the job exists, and reported as one
422 naming every field at fault — including damage targets that select no weighted module of a
stored checkpoint (read from its header, without torch). A job that is admitted fails later
only on what needs the model itself (e.g. the damage targets of a built-in model) or on what
changed meanwhile (a model deleted after submission).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastapi import UploadFile
from pydantic import BaseModel

from core.damage_spec import DamageSpec
from core.exceptions import CheckpointError, DatasetError, ImageError
from core.images import decode_image
from core.train_spec import CheckpointInit, ScratchInit, TrainConfig
from core.transfer_spec import plan_transfer
from service.catalog import DatasetCatalog, DatasetInfo, ModelCatalog, ModelInfo
from service.catalog.weights import SIGNATURES, damage_target_error
from service.problems import ApiError, FieldError
from service.schemas import (
    AnyJobSpec,
    CamJobSpec,
    DamageJobSpec,
    EvaluateJobSpec,
    RetrainJobSpec,
    SweepJobSpec,
    TrainJobSpec,
    TransferJobSpec,
)
from service.settings import Settings
from service.uploads import client_name, safe_filename

if TYPE_CHECKING:
    from core.datasets import ClassMapping

#: Name of the per-job file listing uploaded images (read by the worker).
MANIFEST = "manifest.json"


class InputImage(BaseModel):
    """An uploaded image: the client's name and the stored file (relative to the job folder)."""

    name: str
    file: str


class Manifest(BaseModel):
    images: list[InputImage]


def strict_json(value: Any) -> Any:
    """Refuse the ``NaN`` and ``Infinity`` tokens that Python's JSON reader accepts: they are
    not JSON (RFC 8259), and a NaN would otherwise be reported as "not ≤ 1"."""
    if isinstance(value, str | bytes | bytearray):
        try:
            json.loads(value, parse_constant=_no_constant)
        except ValueError:  # not JSON at all: the Json type reports it
            pass
        except _NonFinite as exc:
            raise ValueError(str(exc)) from None
    return value


class _NonFinite(Exception):
    """A NaN or Infinity token (kept apart from the ValueError of malformed JSON)."""


def _no_constant(token: str) -> Any:
    raise _NonFinite(f"{token} is not valid JSON: write numbers as finite decimals")


class _Checker:
    """Collects reference errors so that one response lists all of them. Models and datasets
    are looked up among ``owner``'s (and the built-in models)."""

    def __init__(self, models: ModelCatalog, datasets: DatasetCatalog, owner: str | None) -> None:
        self.models = models
        self.datasets = datasets
        self.owner = owner
        self.errors: list[FieldError] = []

    def fail(self, field: str, message: str) -> None:
        self.errors.append(FieldError(field=field, message=message))

    def model(self, field: str, model_id: str) -> ModelInfo | None:
        info = self.models.get(model_id, self.owner)
        if info is None:
            self.fail(field, f"no model with id {model_id!r}")
        return info

    def dataset(self, field: str, dataset_id: str) -> DatasetInfo | None:
        info = self.datasets.get(dataset_id, self.owner)
        if info is None:
            self.fail(field, f"no dataset with id {dataset_id!r}")
        return info

    def damage(
        self,
        field: str,
        model: ModelInfo | None,
        spec: DamageSpec | None,
        suffix: str = ".targets",
    ) -> None:
        """Damage targets must select weighted modules of a stored model (built-ins are
        checked by the worker); a problem is reported on ``field + suffix``."""
        if model is None or spec is None or model.builtin:
            return
        try:
            header = self.models.header(model.id, self.owner)
        except CheckpointError:  # replaced or damaged meanwhile: the worker will report it
            return
        problem = None if header is None else damage_target_error(spec, header)
        if problem is not None:
            self.fail(field + suffix, problem)

    def arch(self, field: str, arch: str) -> None:
        if arch not in SIGNATURES:
            self.fail(field, f"unknown architecture {arch!r}; known: {', '.join(SIGNATURES)}")

    def subset(self, field: str, names: Sequence[str], known: Sequence[str], what: str) -> None:
        unknown = [name for name in names if name not in known]
        if unknown:
            self.fail(field, f"unknown {what} {', '.join(map(repr, unknown))}")

    def mapping(
        self,
        field: str,
        mapping: dict[str, str] | None,
        model: ModelInfo | None,
        dataset: DatasetInfo | None,
    ) -> None:
        """A dataset class → model class mapping names classes the two have."""
        if mapping is not None and dataset is not None:
            self.subset(field, list(mapping), dataset.classes, "dataset class")
        if mapping is not None and model is not None and model.classes is not None:
            self.subset(field, list(mapping.values()), model.classes, "model class")

    def init(self, field: str, config: TrainConfig) -> None:
        if isinstance(config.init, CheckpointInit):
            self.model(f"{field}.init.checkpoint", config.init.checkpoint)


def check_references(
    spec: AnyJobSpec,
    settings: Settings,
    models: ModelCatalog,
    datasets: DatasetCatalog,
    uploads: int,
    owner: str | None = None,
) -> None:
    """Check the models, datasets, class names, architecture and damage targets a spec names
    (among ``owner``'s); raise one 422 listing every problem."""
    check = _Checker(models, datasets, owner)
    if uploads and not isinstance(spec, CamJobSpec):
        check.fail("images", "only cam jobs take image files")
    if isinstance(spec, CamJobSpec):
        _check_cam(check, spec, settings, uploads)
    elif isinstance(spec, DamageJobSpec):
        model = check.model("spec.model", spec.model)
        if model is not None and model.builtin:
            check.fail("spec.model", "built-in models have no checkpoint to damage")
        check.damage("spec.damage", model, spec.damage)
    elif isinstance(spec, RetrainJobSpec):
        model = check.model("spec.model", spec.model)
        if model is not None and not model.has_damage_masks:
            check.fail("spec.model", "is not a damaged checkpoint (it has no damage masks)")
        check.dataset("spec.dataset", spec.dataset)
    elif isinstance(spec, TrainJobSpec):
        dataset = check.dataset("spec.dataset", spec.dataset)
        if dataset is not None and spec.classes is not None:
            check.subset("spec.classes", spec.classes, dataset.classes, "class")
        check.init("spec.config", spec.config)
        if spec.arch is None and not isinstance(spec.config.init, CheckpointInit):
            check.fail("spec.arch", "required unless config.init is a checkpoint")
        if spec.arch is not None:
            check.arch("spec.arch", spec.arch)
    elif isinstance(spec, EvaluateJobSpec):
        model = check.model("spec.model", spec.model)
        dataset = check.dataset("spec.dataset", spec.dataset)
        check.mapping("spec.mapping", spec.mapping, model, dataset)
    elif isinstance(spec, TransferJobSpec):
        _check_transfer(check, spec)
    else:
        _check_sweep(check, spec)
    if check.errors:
        raise ApiError(
            422,
            "; ".join(f"{e.field}: {e.message}" for e in check.errors),
            problem="invalid-reference",
            title="The job refers to something that does not exist",
            errors=check.errors,
        )


def _check_cam(check: _Checker, spec: CamJobSpec, settings: Settings, uploads: int) -> None:
    model = check.model("spec.model", spec.model)
    if model is not None and model.classes is not None and spec.cam.classes is not None:
        check.subset("spec.cam.classes", spec.cam.classes, model.classes, "class")
    check.damage("spec.damage", model, spec.damage)
    if spec.images is None and not uploads:
        check.fail("images", "upload at least one image, or name a dataset in spec.images")
    elif spec.images is not None and uploads:
        check.fail("images", "give uploaded images or spec.images, not both")
    elif uploads > settings.max_images_per_job:
        check.fail("images", f"at most {settings.max_images_per_job} images per job")
    if spec.images is not None:
        dataset = check.dataset("spec.images.dataset", spec.images.dataset)
        if dataset is not None:
            classes = spec.images.classes or dataset.classes
            check.subset("spec.images.classes", classes, dataset.classes, "class")
            total = sum(min(spec.images.limit, dataset.counts.get(c, 0)) for c in classes)
            if total > settings.max_images_per_job:
                check.fail(
                    "spec.images.limit",
                    f"selects {total} images, over the limit of {settings.max_images_per_job}",
                )
    if spec.retrain is not None:
        check.dataset("spec.retrain.dataset", spec.retrain.dataset)
        check.init("spec.retrain.config", spec.retrain.config)
        if spec.damage is None:
            check.fail(
                "spec.retrain", "masked retraining restores a damaged network: give spec.damage"
            )


def cam_batchable(spec: AnyJobSpec, uploads: int) -> bool:
    """Whether a job may share a worker's forward pass with other CAM jobs: intact-only CAMs
    (no damage, no retraining: those change the weights) of exactly one uploaded image. One
    image per job bounds a batch of ``cam_batch_max_size`` jobs to that many images in memory;
    larger jobs already fill a pass of their own. Which jobs actually share one — same model,
    same options — the worker decides."""
    return (
        isinstance(spec, CamJobSpec)
        and spec.damage is None
        and spec.retrain is None
        and spec.images is None
        and uploads == 1
    )


def _check_transfer(check: _Checker, spec: TransferJobSpec) -> None:
    """The model and target dataset must meet through the mapping (one is UC Merced, the other
    AID), and fine-tuning must start from the model and keep test images."""
    model = check.model("spec.model", spec.model)
    dataset = check.dataset("spec.dataset", spec.dataset)
    if model is not None and model.builtin:
        check.fail("spec.model", "transfer needs a model trained on UC Merced or AID classes")
    elif model is not None and model.classes is not None and dataset is not None:
        try:
            # The spec's mapping has the attributes plan_transfer reads (see ClassMappingSpec).
            plan_transfer(model.classes, dataset.classes, cast("ClassMapping", spec.mapping))
        except DatasetError as exc:
            field = "spec.dataset" if exc.field == "target_root" else "spec.mapping"
            check.fail(field, exc.message)
    if spec.cam.classes is not None:
        check.fail("spec.cam.classes", "each network explains its own top classes: leave unset")
    if spec.fine_tune is not None:
        if not isinstance(spec.fine_tune.init, ScratchInit):
            check.fail("spec.fine_tune.init", "fine-tuning starts from the model: leave unset")
        if spec.fine_tune.test_fraction == 0:
            check.fail(
                "spec.fine_tune.test_fraction",
                "must be > 0: before and after are compared on held-out target images",
            )


def _check_sweep(check: _Checker, spec: SweepJobSpec) -> None:
    """The dataset must hold images of the model's classes, and every location must select
    weighted modules of a stored model."""
    model = check.model("spec.model", spec.model)
    dataset = check.dataset("spec.dataset", spec.dataset)
    check.mapping("spec.mapping", spec.mapping, model, dataset)
    if spec.mapping is not None and spec.split == "test":
        check.fail("spec.split", "the test split is one of the model's own dataset: no mapping")
    shared = (
        None
        if model is None or model.classes is None or dataset is None
        else set(model.classes) & set(dataset.classes)
    )
    if spec.mapping is None and shared == set():
        check.fail(
            "spec.dataset",
            "has no class of the model; name its classes' counterparts in spec.mapping",
        )
    for location in spec.config.locations:
        target = DamageSpec(targets=[location], fraction=1.0, fault=spec.config.fault)
        check.damage("spec.config.locations", model, target, suffix="")


def store_images(uploads: Sequence[UploadFile], folder: Path, max_pixels: int) -> Manifest:
    """Validate every uploaded image (full decode, pixel limit) and store its bytes in
    ``folder`` with a manifest; a 422 naming ``images[i]`` for the first bad one, in which case
    nothing is left behind."""
    images: list[InputImage] = []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for index, upload in enumerate(uploads):
            name = client_name(upload, f"image-{index}")
            upload.file.seek(0)
            data = upload.file.read()
            try:
                decode_image(data, max_pixels=max_pixels, name=name)
            except ImageError as exc:
                raise ApiError(
                    422,
                    exc.message,
                    problem="invalid-image",
                    errors=[FieldError(field=f"images[{index}]", message=exc.message)],
                ) from exc
            stored = f"{index:03d}-{safe_filename(name, 'image')}"
            (folder / stored).write_bytes(data)
            images.append(InputImage(name=name, file=stored))
        manifest = Manifest(images=images)
        (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return manifest


def spec_document(spec: AnyJobSpec) -> dict[str, Any]:
    """The spec as stored on the job and echoed back (defaults filled in)."""
    data: dict[str, Any] = spec.model_dump(mode="json")
    return data
