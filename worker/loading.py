"""Turning the ids in a job spec into things the core takes: models, checkpoints, images,
dataset folders — among the job owner's only. Every miss is an
:class:`core.exceptions.InputError` naming the spec field, so the job fails with a message the
client can act on (e.g. a model deleted after submission).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from core.checkpoint import Checkpoint, load_model
from core.checkpoint_meta import CheckpointMeta
from core.datasets import ClassMapping, ImageDataset, ImageFolder, stratified_split
from core.engine import prepare_for_inference
from core.evaluation import folder_samples
from core.exceptions import CheckpointError, DatasetError, UnknownClassError
from core.images import decode_image
from core.models import IMAGENET_CLASSES, build_model, get_arch
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.sweep import EvalSet, RetrainData, balanced_subset
from core.train_spec import CheckpointInit, TrainConfig
from core.training_data import SplitSettings, training_split
from core.transforms import eval_transform, train_transform
from service.schemas import ClassMappingSpec, SweepJobSpec
from service.submission import MANIFEST, Manifest
from worker.runtime import JobContext, Loaded, current_device, model_cache


def checkpoint_path(ctx: JobContext, model_id: str, field: str = "spec.model") -> Path:
    """The stored checkpoint of ``model_id`` among the job owner's models."""
    path = ctx.services.models.checkpoint_path(model_id, ctx.owner)
    if path is None:
        raise CheckpointError(f"no stored checkpoint for model {model_id!r}", field=field)
    return path


def load(ctx: JobContext, model_id: str, field: str = "spec.model") -> Loaded:
    """A fresh model (the caller may modify it) and its checkpoint, on this process's device."""
    device = current_device()
    if model_id in ctx.services.models.builtins:
        return _load_builtin(model_id, device)
    model, checkpoint = load_model(checkpoint_path(ctx, model_id, field), device=device)
    return model, checkpoint


def cached(ctx: JobContext, model_id: str, field: str = "spec.model") -> Loaded:
    """A shared, read-only model from this process's LRU cache. Ids are content digests, so
    one owner's cached copy serves another's identical upload; the owner must still have it.
    Cached models are put in channels_last once, when loaded (the CAM engine's layout; damage,
    retraining and checkpoint writing are layout-agnostic), so no task converts a shared model."""
    if model_id not in ctx.services.models.builtins:
        checkpoint_path(ctx, model_id, field)
    return model_cache().get(model_id, lambda: _for_inference(load(ctx, model_id, field)))


def _for_inference(loaded: Loaded) -> Loaded:
    model, checkpoint = loaded
    return prepare_for_inference(model), checkpoint


def _load_builtin(model_id: str, device: str) -> Loaded:
    from torchvision.models import get_weight

    arch = model_id.partition(":")[0]
    spec = get_arch(arch)
    model = build_model(arch, IMAGENET_CLASSES, pretrained=True).eval().to(device)
    assert spec.weights is not None  # build_model(pretrained=True) checked it
    meta = CheckpointMeta(
        arch=arch,
        classes=_unique(get_weight(spec.weights).meta["categories"]),
        preprocessing=Preprocessing(input_size=224),
        provenance={"weights": spec.weights},
    )
    return model, Checkpoint(meta=meta, state_dict={})


def _unique(names: list[str]) -> list[str]:
    """ImageNet's category list repeats two names ("crane", "maillot"); a checkpoint's classes
    must be unique, so repeats get their index appended."""
    seen = Counter(names)
    return [f"{name} ({i})" if seen[name] > 1 else name for i, name in enumerate(names)]


def resolve_init(ctx: JobContext, config: TrainConfig, field: str) -> TrainConfig:
    """``config`` with a ``checkpoint`` init's model id replaced by the checkpoint's path (the
    API names models by id; the core reads files)."""
    if not isinstance(config.init, CheckpointInit):
        return config
    path = checkpoint_path(ctx, config.init.checkpoint, f"{field}.init.checkpoint")
    return config.model_copy(update={"init": CheckpointInit(checkpoint=str(path))})


def dataset_root(ctx: JobContext, dataset_id: str, field: str) -> Path:
    """The folder of class folders of one of the job owner's datasets."""
    root = ctx.services.datasets.images_root(dataset_id, ctx.owner)
    if root is None:
        raise DatasetError(f"no dataset with id {dataset_id!r}", field=field)
    return root


def uploaded_images(ctx: JobContext) -> list[tuple[str, Image.Image]]:
    """The images uploaded with the job, decoded (they were validated at upload)."""
    manifest_path = ctx.inputs / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError("the job's uploaded images are missing", field="images")
    manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    limit = ctx.services.settings.max_image_pixels
    return [
        (item.name, decode_image(ctx.inputs / item.file, max_pixels=limit, name=item.name))
        for item in manifest.images
    ]


def dataset_images(
    ctx: JobContext, dataset_id: str, classes: list[str] | None, per_class: int
) -> list[tuple[str, Image.Image]]:
    """The first ``per_class`` images (by file name) of each class (default: every class),
    named ``<class>/<file>``."""
    root = dataset_root(ctx, dataset_id, "spec.images.dataset")
    folder = ImageFolder.from_path(root)
    wanted = set(classes) if classes is not None else set(folder.classes)
    unknown = wanted - set(folder.classes)
    if unknown:
        raise UnknownClassError(
            f"the dataset has no class {', '.join(sorted(map(repr, unknown)))}",
            field="spec.images.classes",
        )
    taken: Counter[int] = Counter()
    limit = ctx.services.settings.max_image_pixels
    images = []
    for sample in folder.samples:
        name = folder.classes[sample.label]
        if name not in wanted or taken[sample.label] >= per_class:
            continue
        taken[sample.label] += 1
        label = f"{name}/{sample.path.name}"
        images.append((label, decode_image(sample.path, max_pixels=limit, name=label)))
    return images


def class_mapping(spec: ClassMappingSpec) -> ClassMapping:
    """The core's class mapping from the API's (``ucm_aid_classes.json``'s) form."""
    return ClassMapping(dict(spec.ucm_to_aid), tuple(spec.unseen.ucm), tuple(spec.unseen.aid))


def sweep_inputs(
    ctx: JobContext, spec: SweepJobSpec, meta: CheckpointMeta
) -> tuple[EvalSet, RetrainData | None]:
    """The images a sweep evaluates (``spec.split`` of the dataset, labelled in the model's
    classes, at most ``spec.limit`` balanced over classes) decoded once, and — with
    ``config.retrain_at`` — the training images of masked retraining: the training split the
    model's lineage records for the dataset, else one drawn from the sweep's seed (the same
    choice as ``camres sweep``)."""
    root = dataset_root(ctx, spec.dataset, "spec.dataset")
    mapping = ClassMapping(dict(spec.mapping)) if spec.mapping is not None else None
    samples = folder_samples(meta, root, mapping=mapping, split=spec.split)
    if spec.limit is not None:
        samples = balanced_subset(samples, spec.limit)
    ctx.progress(Progress(0.0, "load", f"decoding {len(samples)} evaluation images"))
    pre = meta.preprocessing
    eval_set = EvalSet.from_dataset(
        ImageDataset(samples, eval_transform(pre)), should_stop=ctx.should_stop
    )
    config = spec.config
    if not config.retrain_at:
        return eval_set, None
    pool = (mapping or ClassMapping(ucm_to_aid={})).align(ImageFolder.from_path(root), meta.classes)
    parts = training_split(meta) or SplitSettings(
        config.seed, config.retrain.val_fraction, config.retrain.test_fraction
    )
    held = stratified_split(pool.samples, parts.val_fraction, parts.test_fraction, parts.seed)
    val = ImageDataset(held.val, eval_transform(pre)) if held.val else None
    return eval_set, RetrainData(ImageDataset(held.train, train_transform(pre)), val)
