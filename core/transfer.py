"""Cross-dataset transfer, the paper's §4.1 (Figures 3–4): a classifier trained on one aerial
dataset tested on the other through a class mapping, then optionally fine-tuned on it.

Vasu & Savakis train ResNet50 on UC Merced and test it on AID, and vice versa, "without
retraining" (Fig. 3). Accuracy is only defined on the classes both datasets share, matched
through ``ucm_aid_classes.json``; an image of a class the model never saw (AID's Bridge for a
UC Merced model, UC Merced's intersection for an AID model) still gets a prediction —
necessarily a source class — and a CAM, which is what the figure's bottom row shows. Fig. 4 then
shows the CAMs after transfer learning: the backbone fine-tuned on the target dataset, under a
head with one output per target class.

:func:`core.transfer_spec.plan_transfer` does the bookkeeping (which way the mapping applies,
which target classes are shared and which unseen), :func:`transfer` the experiment, and
:func:`core.transfer_figure.write_transfer_report` draws the Figure 3 grid and writes the JSON.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader

from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta, LineageStep
from core.datasets import ClassMapping, ImageDataset, ImageFolder, Sample
from core.evaluation import resolve_device
from core.exceptions import InputError
from core.explain import Explanation, explain
from core.hooks import eval_mode
from core.images import decode_image
from core.models import get_arch, replace_head
from core.preprocessing import Preprocessing
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.train_spec import ScratchInit, TrainConfig, TrainResult
from core.training import fit
from core.training_data import load_splits
from core.transfer_spec import (
    FineTuneSummary,
    SampleSummary,
    TransferAccuracy,
    TransferPlan,
    TransferSummary,
    overall_accuracy,
    plan_transfer,
    tally,
)
from core.transforms import eval_transform

__all__ = ["FineTuned", "TransferResult", "TransferSample", "transfer"]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TransferSample:
    """A sample image and its explanations. ``expected`` is the source class a correct
    prediction names, None for an unseen class; after fine-tuning the target class itself is
    the correct answer."""

    name: str
    path: Path
    target_class: str
    expected: str | None
    image: Image.Image
    before: Explanation
    after: Explanation | None = None

    @property
    def shared(self) -> bool:
        return self.expected is not None

    def summary(self) -> SampleSummary:
        before = self.before.result
        after = None if self.after is None else self.after.result
        return SampleSummary(
            image=self.name,
            path=str(self.path),
            target_class=self.target_class,
            kind="shared" if self.shared else "unseen",
            expected=self.expected,
            before=before,
            correct_before=None
            if self.expected is None
            else before.prediction.label == self.expected,
            after=after,
            correct_after=None if after is None else after.prediction.label == self.target_class,
        )


@dataclass
class FineTuned:
    """The fine-tuned network (eval mode) and its checkpoint metadata, ready to save, with how
    training went and the accuracies ``before`` (the source model) and ``after`` on the same
    held-out test images of the target folder."""

    model: nn.Module
    meta: CheckpointMeta
    result: TrainResult
    config: TrainConfig
    split: dict[str, int]
    head_init: dict[str, str]
    before: TransferAccuracy
    after: TransferAccuracy

    def summary(self) -> FineTuneSummary:
        return FineTuneSummary(
            config=self.config,
            result=self.result,
            split=self.split,
            head_init=self.head_init,
            before=self.before,
            after=self.after,
        )


@dataclass
class TransferResult:
    """Everything :func:`transfer` computed; :meth:`summary` is its JSON form."""

    meta: CheckpointMeta
    target_root: Path
    plan: TransferPlan
    options: CamOptions
    before: TransferAccuracy
    samples: list[TransferSample]
    fine_tuned: FineTuned | None = None

    def summary(self) -> TransferSummary:
        return TransferSummary(
            arch=self.meta.arch,
            source_dataset=self.plan.source,
            target_dataset=self.plan.target,
            target_root=str(self.target_root),
            model_classes=list(self.meta.classes),
            shared_classes=self.plan.shared,
            unseen_classes=self.plan.unseen,
            source_only_classes=self.plan.source_only,
            cam=self.options,
            before=self.before,
            fine_tune=None if self.fine_tuned is None else self.fine_tuned.summary(),
            samples=[sample.summary() for sample in self.samples],
        )


# --------------------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class _Job:
    """What the steps of one :func:`transfer` call share."""

    model: nn.Module
    meta: CheckpointMeta
    folder: ImageFolder
    plan: TransferPlan
    options: CamOptions
    batch_size: int
    should_stop: ShouldStop | None

    def truth(self, samples: Sequence[Sample]) -> list[str]:
        return [self.folder.classes[s.label] for s in samples]


def transfer(
    model: nn.Module,
    meta: CheckpointMeta,
    target_root: str | Path,
    mapping: ClassMapping,
    *,
    fine_tune: TrainConfig | None = None,
    samples_per_class: int = 1,
    cam_options: CamOptions | None = None,
    parent_digest: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> TransferResult:
    """Test ``model`` (classes and preprocessing from ``meta``) on the image folder
    ``target_root`` of the other dataset, then optionally fine-tune it there (paper §4.1).

    Every target image is classified once; accuracy counts the shared classes only, a
    prediction being right when it names the mapped source class (the argmax runs over all the
    model's classes). CAMs (:func:`core.explain.explain`, each network explaining its own top
    class) are computed for the first ``samples_per_class`` images of every shared and unseen
    class. With ``fine_tune``, a copy of the model gets a head with one output per target class —
    rows of shared classes start from their source class's row, the others fresh — and is
    trained with :func:`core.training.fit` on a stratified split of the target folder; the
    accuracies before and after and the sample CAMs then all use that split's held-out test
    images. ``parent_digest`` (the source checkpoint's) is recorded in the fine-tuned model's
    lineage. ``model`` is moved to ``device`` (default: CUDA when present) and otherwise left
    unchanged.
    """
    options = _check_arguments(samples_per_class, cam_options, fine_tune, batch_size)
    _check_digest(parent_digest)
    folder = ImageFolder.from_path(target_root)
    plan = plan_transfer(meta.classes, folder.classes, mapping)
    job = _Job(model, meta, folder, plan, options, batch_size, should_stop)
    model.to(resolve_device(device))
    # Progress: evaluation, then fine-tuning (when asked), then the sample CAMs.
    evaluated, tuned_at = (0.15, 0.9) if fine_tune is not None else (0.8, 0.8)
    predicted = _predict(
        job,
        model,
        folder.samples,
        meta.classes,
        meta.preprocessing,
        _span(progress, 0.0, evaluated),
    )
    before = tally(job.truth(folder.samples), predicted, plan.shared, plan.shared)
    tuned: FineTuned | None = None
    pool = folder.samples
    if fine_tune is not None:
        pool, tuned = _fine_tune(
            job, fine_tune, predicted, parent_digest, _span(progress, evaluated, tuned_at)
        )
    picked = _pick(pool, folder.classes, plan, samples_per_class)
    samples = _explain_samples(job, picked, tuned, _span(progress, tuned_at, 1.0))
    return TransferResult(meta, folder.root, plan, options, before, samples, tuned)


def _check_arguments(
    samples_per_class: int,
    cam_options: CamOptions | None,
    fine_tune: TrainConfig | None,
    batch_size: int,
) -> CamOptions:
    for name, value in (("samples_per_class", samples_per_class), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}", field=name)
    options = cam_options or CamOptions()
    if options.classes is not None:
        # The source and the fine-tuned network have different class lists: each explains
        # its own top classes instead.
        raise InputError(
            "transfer explains each network's own top classes; leave classes unset",
            field="cam_options.classes",
        )
    if fine_tune is not None:
        if not isinstance(fine_tune.init, ScratchInit):
            raise InputError(
                "fine-tuning starts from the transferred model; leave init unset",
                field="fine_tune.init",
            )
        if fine_tune.test_fraction == 0:
            raise InputError(
                "fine-tuning needs held-out test images to compare before and after",
                field="fine_tune.test_fraction",
            )
    return options


def _check_digest(digest: str | None) -> None:
    try:  # fail now, not after training, on a malformed digest
        LineageStep(op="train", parent_digest=digest)
    except ValidationError as exc:
        raise InputError(
            f"parent_digest must look like 'sha256:<64 hex digits>', got {digest!r}",
            field="parent_digest",
        ) from exc


def _predict(
    job: _Job,
    model: nn.Module,
    samples: Sequence[Sample],
    classes: Sequence[str],
    pre: Preprocessing,
    progress: ProgressCallback | None,
) -> list[str]:
    """The name of the class ``model`` (scoring ``classes``) predicts for each sample."""
    device = _device_of(model)
    dataset = ImageDataset(samples, eval_transform(pre))
    indices: list[Tensor] = []
    done = 0
    with eval_mode(model), torch.inference_mode():
        for images, _ in DataLoader(dataset, batch_size=job.batch_size):
            check_stop(job.should_stop, "transfer evaluation")
            indices.append(model(images.to(device)).argmax(dim=1).cpu())
            done += len(images)
            report(progress, Progress(done / len(samples), "evaluate", f"{done}/{len(samples)}"))
    return [classes[i] for i in torch.cat(indices).tolist()] if indices else []


def _pick(
    pool: Sequence[Sample], classes: Sequence[str], plan: TransferPlan, per_class: int
) -> list[Sample]:
    """The first ``per_class`` images (by file name) of every shared class, then of every
    unseen class, in the folder's class order."""
    by_class: dict[str, list[Sample]] = {}
    for sample in sorted(pool, key=lambda s: (s.label, s.path.name)):
        by_class.setdefault(classes[sample.label], []).append(sample)
    ordered = [*plan.shared, *plan.unseen]
    return [s for name in ordered for s in by_class.get(name, [])[:per_class]]


def _explain_samples(
    job: _Job,
    picked: Sequence[Sample],
    tuned: FineTuned | None,
    progress: ProgressCallback | None,
) -> list[TransferSample]:
    """CAMs of the sample images by the source network and, when there is one, the
    fine-tuned network (each explaining its own top classes)."""
    classes = job.folder.classes
    images = [
        (f"{classes[s.label]}/{s.path.name}", decode_image(s.path, name=str(s.path)))
        for s in picked
    ]
    middle = 0.5 if tuned is not None else 1.0
    before = explain(
        job.model,
        job.meta,
        images,
        job.options,
        progress=_span(progress, 0.0, middle),
        should_stop=job.should_stop,
    )
    after: list[Explanation | None] = [None] * len(images)
    if tuned is not None:
        after = list(
            explain(
                tuned.model,
                tuned.meta,
                images,
                job.options,
                progress=_span(progress, middle, 1.0),
                should_stop=job.should_stop,
            )
        )
    return [
        TransferSample(
            name=name,
            path=sample.path,
            target_class=classes[sample.label],
            expected=job.plan.shared.get(classes[sample.label]),
            image=image,
            before=b,
            after=a,
        )
        for sample, (name, image), b, a in zip(picked, images, before, after, strict=True)
    ]


# --------------------------------------------------------------------------- fine-tuning


def _fine_tune(
    job: _Job,
    config: TrainConfig,
    predicted: Sequence[str],
    parent_digest: str | None,
    progress: ProgressCallback | None,
) -> tuple[list[Sample], FineTuned]:
    """Transfer learning on the target folder (Fig. 4): a copy of the model under a head for
    the target classes, trained on a stratified training split. Returns the held-out test
    samples and the fine-tuned network with the accuracies on them before and after."""
    pre = job.meta.preprocessing
    if config.input_size is not None:
        pre = pre.model_copy(update={"input_size": config.input_size})
    data = load_splits(
        job.folder,
        pre,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        should_stop=job.should_stop,
    )
    model = copy.deepcopy(job.model)  # the caller's model (a worker's cached one) stays as is
    head_init = _transfer_head(model, job.meta, job.folder.classes, job.plan, config.seed)
    result = fit(
        model,
        data.train,
        data.val,
        config,
        progress=_span(progress, 0.0, 0.95),
        should_stop=job.should_stop,
    )
    model.eval()
    test = data.split.test
    classes = job.folder.classes
    by_path = dict(zip((s.path for s in job.folder.samples), predicted, strict=True))
    truth = job.truth(test)
    before = tally(truth, [by_path[s.path] for s in test], job.plan.shared, job.plan.shared)
    after_predicted = _predict(job, model, test, classes, pre, _span(progress, 0.95, 1.0))
    after = tally(truth, after_predicted, {name: name for name in classes}, job.plan.shared)
    split = {"train": len(data.split.train), "val": len(data.split.val), "test": len(test)}
    meta = _tuned_meta(job, pre, config, result, split, head_init, after, parent_digest)
    return test, FineTuned(model, meta, result, config, split, head_init, before, after)


def _transfer_head(
    model: nn.Module,
    meta: CheckpointMeta,
    target_classes: Sequence[str],
    plan: TransferPlan,
    seed: int,
) -> dict[str, str]:
    """Give ``model`` a head with one output per target class. A shared class's row (weights
    and bias) starts as its source class's — before any training the new head then scores
    shared images as the old one did — and an unseen class's row is freshly initialized.
    Returns target class → the source class its row came from."""
    spec = get_arch(meta.arch)
    old = model.get_submodule(spec.logits_layer)
    with torch.random.fork_rng(devices=[]):  # reproducible fresh rows, caller's RNG untouched
        torch.manual_seed(seed)
        new = replace_head(model, spec, len(target_classes))
    source_index = {name: i for i, name in enumerate(meta.classes)}
    pairs = [
        (j, source_index[plan.shared[name]])
        for j, name in enumerate(target_classes)
        if name in plan.shared
    ]
    if not isinstance(old, nn.Linear) or not pairs:
        return {}
    rows = torch.tensor([j for j, _ in pairs], device=new.weight.device)
    source_rows = torch.tensor([i for _, i in pairs], device=old.weight.device)
    with torch.no_grad():
        new.weight[rows] = old.weight[source_rows].to(new.weight)
        if new.bias is not None and old.bias is not None:
            new.bias[rows] = old.bias[source_rows].to(new.bias)
    return {target_classes[j]: meta.classes[i] for j, i in pairs}


def _tuned_meta(
    job: _Job,
    pre: Preprocessing,
    config: TrainConfig,
    result: TrainResult,
    split: dict[str, int],
    head_init: dict[str, str],
    after: TransferAccuracy,
    parent_digest: str | None,
) -> CheckpointMeta:
    # A "train" step whose config records the split, so later steps (evaluate --split test,
    # damage sweeps) hold out the same target images. Every weight was trained: no damage.
    folder, plan = job.folder, job.plan
    step = LineageStep(
        op="train",
        parent_digest=parent_digest,
        params={
            "config": config.model_dump(mode="json"),
            "dataset": str(folder.root),
            "transfer": {"source": plan.source, "target": plan.target, "head_init": head_init},
        },
    )
    provenance: dict[str, Any] = {
        "dataset": {"root": str(folder.root), "layout": folder.layout, "images": len(folder)},
        "split": split,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "test_accuracy": overall_accuracy(after),
        "transferred_from": {"arch": job.meta.arch, "classes": list(job.meta.classes)},
        "device": result.device,
    }
    return CheckpointMeta(
        arch=job.meta.arch,
        classes=list(folder.classes),
        preprocessing=pre,
        provenance=provenance,
        lineage=[*job.meta.lineage, step],
    )


# --------------------------------------------------------------------------- helpers


def _span(callback: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    """``callback`` with fractions mapped from [0, 1] into [start, end] of the whole job."""
    if callback is None:
        return None

    def relay(p: Progress) -> None:
        callback(Progress(start + (end - start) * p.fraction, p.stage, p.message, p.metrics))

    return relay


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
