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
from core.datasets import ImageFolder
from core.exceptions import CheckpointError, DatasetError, UnknownClassError
from core.images import decode_image
from core.models import IMAGENET_CLASSES, build_model, get_arch
from core.preprocessing import Preprocessing
from core.train_spec import CheckpointInit, TrainConfig
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
    one owner's cached copy serves another's identical upload; the owner must still have it."""
    if model_id not in ctx.services.models.builtins:
        checkpoint_path(ctx, model_id, field)
    return model_cache().get(model_id, lambda: load(ctx, model_id, field))


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
