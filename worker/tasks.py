"""Celery tasks, one per job kind, registered as ``camres.<kind>``.

Each task is thin, like a web view: decode the ids in the job's spec into models, images and
folders (:mod:`worker.loading`), call one core function, store the artifacts, and return a small
JSON result that :func:`worker.runtime.run_job` writes to the job record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded

from core.checkpoint import save_checkpoint
from core.damage import damage_checkpoint
from core.datasets import ClassMapping
from core.evaluation import evaluate_folder
from core.explain import write_artifacts
from core.resilience import ConditionsResult, RetrainPlan, explain_conditions, retrain_checkpoint
from core.results import ImageCam
from core.training import train_classifier
from core.transfer import transfer
from core.transfer_figure import CAMS_DIR, REPORT_FILE, write_transfer_report
from core.transfer_spec import TransferSummary
from service.queue import task_name
from service.schemas import (
    CamConditions,
    CamImageResult,
    CamJobSpec,
    CamResult,
    DamageJobSpec,
    EvaluateJobSpec,
    ModelJobResult,
    RetrainJobSpec,
    SweepJobSpec,
    TrainJobSpec,
    TransferJobResult,
    TransferJobSpec,
)
from service.store import JobError
from worker import batch_members, loading, sweep_fanout
from worker.app import celery_app
from worker.batching import SharedForward, run_batch
from worker.runtime import JobBody, JobContext, current_device, run_job, services


class JobTask(Task):
    """Base of camres tasks: the job id is the only argument."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # run_job records every error a task body raises; what reaches here is the pool
        # killing the process at the hard time limit, reported in the main process. The task's
        # message is acknowledged then, so the jobs of a batch it led end with it.
        if isinstance(exc, TimeLimitExceeded) and args:
            svc = services()
            limit = svc.settings.task_time_limit
            error = JobError(
                type="TimeLimitExceeded", message=f"the job was stopped after {limit} s"
            )
            svc.store.finish(args[0], "failed", error=error)
            batch_members.fail(svc.store, args[0], error)


def _run(task: Task, job_id: str, body: JobBody) -> dict[str, Any]:
    return run_job(job_id, task.request.hostname or "worker", body)


def write_json(ctx: JobContext, name: str, data: Any) -> Path:
    """Store a JSON artifact of the job."""
    path = ctx.artifacts / name
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# --- cam -----------------------------------------------------------------------------------------
@celery_app.task(name=task_name("cam"), base=JobTask, bind=True)
def cam(self: Task, job_id: str) -> dict[str, Any]:
    """CAMs and HAR boxes of a job's images; from the batch queue, with the batchable jobs
    waiting there, in shared forward passes (:mod:`worker.batching`)."""
    settings = services().settings
    arrived = (self.request.delivery_info or {}).get("routing_key")
    if settings.cam_batching and arrived == settings.cam_batch_queue:
        worker = self.request.hostname or "worker"
        return run_batch(self.app, settings, worker, job_id, run_cam)
    return _run(self, job_id, run_cam)


def run_cam(ctx: JobContext, shared: SharedForward | None = None) -> dict[str, Any]:
    """The job's CAMs; with ``shared``, an intact-only job's pass is its batch's."""
    spec = CamJobSpec.model_validate(ctx.spec)
    if spec.images is not None:
        images = loading.dataset_images(
            ctx, spec.images.dataset, spec.images.classes, spec.images.limit
        )
    else:
        images = loading.uploaded_images(ctx)
    plan = None
    if spec.retrain is not None:
        root = loading.dataset_root(ctx, spec.retrain.dataset, "spec.retrain.dataset")
        plan = RetrainPlan(dataset_root=root, config=spec.retrain.config)
    # The cached model is shared: explain_conditions restores it (damage) or works on a copy
    # (retraining), so the next job finds it intact. It was loaded onto this process's device:
    # no device argument, which would walk every module to move it there again.
    model, checkpoint = loading.cached(ctx, spec.model)
    if shared is not None and spec.damage is None and plan is None:
        intact = shared(ctx, spec.model, model, checkpoint.meta, images, spec.cam)
        conditions = ConditionsResult(explanations={"intact": intact})
    else:
        conditions = explain_conditions(
            model,
            checkpoint.meta,
            images,
            spec.cam,
            damage=spec.damage,
            retrain_plan=plan,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )
    entries = []
    for index, (name, image) in enumerate(images):
        results = {
            condition: write_artifacts(
                explanations[index],
                image,
                ctx.artifacts,
                spec.cam,
                prefix=f"{index:03d}_{condition}_",
            )
            for condition, explanations in conditions.explanations.items()
        }
        entries.append(CamImageResult(image=name, conditions=CamConditions(**results)))
    result = CamResult(
        images=entries, damage=conditions.damage, retrain=conditions.retrain
    ).model_dump(mode="json")
    write_json(ctx, "result.json", result)
    return result


# --- damage -----------------------------------------------------------------------------------
@celery_app.task(name=task_name("damage"), base=JobTask, bind=True)
def damage(self: Task, job_id: str) -> dict[str, Any]:
    """A damaged copy of a model, stored as a new model."""
    return _run(self, job_id, run_damage)


def run_damage(ctx: JobContext) -> dict[str, Any]:
    spec = DamageJobSpec.model_validate(ctx.spec)
    source = loading.checkpoint_path(ctx, spec.model)
    produced = ctx.services.models.new_tmp_path()
    damage_checkpoint(source, spec.damage, produced)
    info, _ = ctx.services.models.add(produced, ctx.owner)
    result = ModelJobResult(
        model=info.id, details={"parent": spec.model, "damage": info.damage}
    ).model_dump(mode="json")
    write_json(ctx, "model.json", info.model_dump(mode="json"))
    return result


# --- retrain ------------------------------------------------------------------------------------
@celery_app.task(name=task_name("retrain"), base=JobTask, bind=True)
def retrain(self: Task, job_id: str) -> dict[str, Any]:
    """Masked retraining of a damaged model, stored as a new model."""
    return _run(self, job_id, run_retrain)


def run_retrain(ctx: JobContext) -> dict[str, Any]:
    spec = RetrainJobSpec.model_validate(ctx.spec)
    source = loading.checkpoint_path(ctx, spec.model)
    root = loading.dataset_root(ctx, spec.dataset, "spec.dataset")
    produced = ctx.services.models.new_tmp_path()
    outcome = retrain_checkpoint(
        source,
        root,
        spec.config,
        produced,
        progress=ctx.progress,
        should_stop=ctx.should_stop,
    )
    info, _ = ctx.services.models.add(produced, ctx.owner)
    details = {
        "train": outcome.result.model_dump(mode="json"),
        "damage_check": outcome.damage_check,
        "before": None if outcome.before is None else outcome.before.model_dump(mode="json"),
        "after": None if outcome.after is None else outcome.after.model_dump(mode="json"),
    }
    write_json(ctx, "retraining.json", {"model": info.id, **details})
    return ModelJobResult(model=info.id, details=details).model_dump(mode="json")


# --- train ------------------------------------------------------------------------------------
@celery_app.task(name=task_name("train"), base=JobTask, bind=True)
def train(self: Task, job_id: str) -> dict[str, Any]:
    """Train a classifier on a dataset, stored as a new model."""
    return _run(self, job_id, run_train)


def run_train(ctx: JobContext) -> dict[str, Any]:
    spec = TrainJobSpec.model_validate(ctx.spec)
    root = loading.dataset_root(ctx, spec.dataset, "spec.dataset")
    trained = train_classifier(
        root,
        spec.arch,
        loading.resolve_init(ctx, spec.config, "spec.config"),
        classes=spec.classes,
        progress=ctx.progress,
        should_stop=ctx.should_stop,
    )
    produced = ctx.services.models.new_tmp_path()
    trained.save(produced)
    info, _ = ctx.services.models.add(produced, ctx.owner)
    details = {
        "train": trained.result.model_dump(mode="json"),
        "evaluation": None
        if trained.evaluation is None
        else trained.evaluation.model_dump(mode="json"),
    }
    write_json(ctx, "training.json", {"model": info.id, **details})
    return ModelJobResult(model=info.id, details=details).model_dump(mode="json")


# --- evaluate ------------------------------------------------------------------------------------
@celery_app.task(name=task_name("evaluate"), base=JobTask, bind=True)
def evaluate_model(self: Task, job_id: str) -> dict[str, Any]:
    """Accuracy and confusion matrix of a model on a dataset."""
    return _run(self, job_id, run_evaluate)


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    spec = EvaluateJobSpec.model_validate(ctx.spec)
    model, checkpoint = loading.cached(ctx, spec.model)
    evaluation = evaluate_folder(
        model,
        checkpoint.meta,
        loading.dataset_root(ctx, spec.dataset, "spec.dataset"),
        mapping=None if spec.mapping is None else ClassMapping(dict(spec.mapping)),
        device=current_device(),
        progress=ctx.progress,
        should_stop=ctx.should_stop,
    )
    result: dict[str, Any] = evaluation.model_dump(mode="json")
    write_json(ctx, "evaluation.json", result)
    return result


# --- transfer ------------------------------------------------------------------------------------
@celery_app.task(name=task_name("transfer"), base=JobTask, bind=True)
def transfer_model(self: Task, job_id: str) -> dict[str, Any]:
    """Cross-dataset transfer of a model, optionally fine-tuned (stored as a new model)."""
    return _run(self, job_id, run_transfer)


def run_transfer(ctx: JobContext) -> dict[str, Any]:
    spec = TransferJobSpec.model_validate(ctx.spec)
    root = loading.dataset_root(ctx, spec.dataset, "spec.dataset")
    # transfer() leaves the cached model as it was: fine-tuning works on a copy.
    model, checkpoint = loading.cached(ctx, spec.model)
    result = transfer(
        model,
        checkpoint.meta,
        root,
        loading.class_mapping(spec.mapping),
        fine_tune=spec.fine_tune,
        samples_per_class=spec.samples_per_class,
        cam_options=spec.cam,
        parent_digest=checkpoint.digest,
        device=current_device(),
        progress=ctx.progress,
        should_stop=ctx.should_stop,
    )
    report = write_transfer_report(result, ctx.artifacts)
    report = _flat_transfer_report(ctx, report, root, spec.dataset)
    tuned_id = None
    if result.fine_tuned is not None:
        produced = ctx.services.models.new_tmp_path()
        save_checkpoint(produced, result.fine_tuned.model, result.fine_tuned.meta)
        tuned_id = ctx.services.models.add(produced, ctx.owner)[0].id
    return TransferJobResult(model=tuned_id, report=report).model_dump(mode="json")


def _flat_transfer_report(
    ctx: JobContext, report: TransferSummary, root: Path, dataset: str
) -> TransferSummary:
    """The report as the API serves it, rewritten to ``transfer.json``: the sample artifacts
    moved out of their subfolder (artifact names are flat: ``cams/x`` becomes ``cams_x``), the
    target named by its dataset id and the samples by their path in it, never by server paths."""
    folder = ctx.artifacts / CAMS_DIR
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            path.replace(ctx.artifacts / f"{CAMS_DIR}_{path.name}")
        folder.rmdir()
    samples = [
        sample.model_copy(
            update={
                "path": Path(sample.path).relative_to(root).as_posix(),
                "before": _flat_names(sample.before),
                "after": None if sample.after is None else _flat_names(sample.after),
            }
        )
        for sample in report.samples
    ]
    report = report.model_copy(update={"target_root": dataset, "samples": samples})
    write_json(ctx, REPORT_FILE, report.model_dump(mode="json"))
    return report


def _flat_names(result: ImageCam) -> ImageCam:
    cams = [
        cam.model_copy(
            update={
                "artifacts": {kind: name.replace("/", "_") for kind, name in cam.artifacts.items()}
            }
        )
        for cam in result.cams
    ]
    return result.model_copy(update={"cams": cams})


# --- sweep -------------------------------------------------------------------------------------
#: The sweep's rows so far, one JSON document per line, readable while the job runs.
CELLS_JSONL = sweep_fanout.CELLS_JSONL


@celery_app.task(name=task_name("sweep"), base=JobTask, bind=True)
def sweep(self: Task, job_id: str) -> dict[str, Any]:
    """Damage sweep: accuracy and CAM drift per location, fraction and trial; split into parts
    run by several workers when more than one is live (:mod:`worker.sweep_fanout`)."""
    dispatched = sweep_fanout.dispatch(job_id, self.request.hostname or "worker")
    return dispatched if dispatched is not None else _run(self, job_id, run_sweep_job)


@celery_app.task(name=sweep_fanout.PART_TASK, base=JobTask, bind=True)
def sweep_part(self: Task, job_id: str, part: str) -> dict[str, Any]:
    """One part of a fanned-out sweep; the part that completes the set merges the report."""
    return sweep_fanout.run_part(job_id, part, self.request.hostname or "worker")


def run_sweep_job(ctx: JobContext) -> dict[str, Any]:
    spec = SweepJobSpec.model_validate(ctx.spec)
    report = sweep_fanout.compute(ctx, spec, spec.config, ctx.artifacts / CELLS_JSONL)
    return sweep_fanout.publish(ctx, report)
