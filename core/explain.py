"""From images to explained predictions: the one entry point the CLI and the worker call.

:func:`explain` preprocesses images exactly as the checkpoint says, runs the requested CAM
method batch by batch (:mod:`core.cam`), brings each map to its image's original size, and
summarizes it with HAR boxes (:mod:`core.har`) in the JSON schema of :mod:`core.results`.
:func:`write_artifacts` then renders one image's overlays and lossless maps (:mod:`core.render`).

Map pipeline, per explained class: raw map F_c at feature resolution (Eq. 1 for CAM) → bilinear
upsampling to the original H×W (``align_corners=False``) → optional ReLU → min-max to [0, 1]
→ HAR at ``har_threshold`` × max.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from core.cam import CAM_METHODS, CamBatch, normalize, resolve_classes, upsample
from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.engine import autocast_dtype, prepare_for_inference, to_device, to_host
from core.exceptions import InputError
from core.folding import folded_view
from core.har import highest_activation_regions
from core.models import get_arch
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.render import (
    PNG_COMPRESS_LEVEL,
    overlay,
    save_map_npy,
    save_map_png16,
    save_mask_png,
)
from core.results import ClassCam, ClassScore, ImageCam
from core.transforms import eval_transform

__all__ = [
    "Explanation",
    "cam_batches",
    "explain",
    "queue_cam_batches",
    "safe_name",
    "write_artifacts",
]

#: File names derived from client input keep only these characters (portable, URL-safe).
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME_CHARS = 80


@dataclass(frozen=True)
class Explanation:
    """One image's result and the arrays behind it, one entry per ``result.cams`` element:
    ``maps`` normalized to [0, 1] at the original image size (float32), ``raw_maps`` at the
    feature layer's resolution before any normalization (float32), ``masks`` the HAR masks."""

    result: ImageCam
    maps: list[np.ndarray]
    raw_maps: list[np.ndarray]
    masks: list[np.ndarray]


def explain(
    model: nn.Module,
    meta: CheckpointMeta,
    images: Sequence[tuple[str, Image.Image]],
    options: CamOptions,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> list[Explanation]:
    """Explain ``images`` — (name, decoded RGB image) pairs — with ``model`` as ``options`` ask.

    The model's predictions and maps come from one forward pass per batch of ``batch_size``, in
    ``options.precision``. ``device`` defaults to the model's; when given, the model is moved
    there. Either way the model is put in channels_last in place
    (:func:`core.engine.prepare_for_inference`: same values, same parameters), and the pass
    runs on its batch-norm-folded view (:func:`core.folding.folded_view`). Unknown class
    names, a method the architecture cannot support and a precision the device cannot run
    raise before anything is computed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(
            f"batch_size must be a positive integer, got {batch_size!r}", field="batch_size"
        )
    _check_images(images)
    arch = get_arch(meta.arch)
    classes = None if options.classes is None else resolve_classes(options.classes, meta.classes)
    method = CAM_METHODS.get(options.method)
    method(model, arch.feature_layer, arch.fc_layer)  # an unsupported model fails here, early
    target = torch.device(device) if device is not None else _device_of(model)
    autocast_dtype(options.precision, target)
    if not images:
        return []
    prepare_for_inference(model, device)
    extractor = method(folded_view(model), arch.feature_layer, arch.fc_layer)
    transform = eval_transform(meta.preprocessing)
    chunks = (
        [transform(image) for _, image in images[start : start + batch_size]]
        for start in range(0, len(images), batch_size)
    )
    batch = cam_batches(
        extractor,
        chunks,
        total=len(images),
        device=target,
        classes=classes,
        top_k=options.top_k,
        precision=options.precision,
        progress=progress,
        should_stop=should_stop,
    )
    return [
        _explain_one(batch, i, name, image.size, meta.classes, options)
        for i, (name, image) in enumerate(images)
    ]


def cam_batches(
    extractor: Callable[..., CamBatch],
    chunks: Iterable[Sequence[Tensor]],
    *,
    total: int,
    device: torch.device,
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    precision: str = "fp32",
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> CamBatch:
    """Run ``extractor`` over ``chunks`` of preprocessed C×H×W host tensors (``total`` images in
    all) on ``device`` and return the whole result on the CPU: :func:`queue_cam_batches`, then
    one transfer back (:func:`core.engine.to_host`)."""
    queued = queue_cam_batches(
        extractor,
        chunks,
        total=total,
        device=device,
        classes=classes,
        top_k=top_k,
        precision=precision,
        progress=progress,
        should_stop=should_stop,
    )
    return CamBatch(*to_host([getattr(queued, f) for f in _BATCH_FIELDS]))


def queue_cam_batches(
    extractor: Callable[..., CamBatch],
    chunks: Iterable[Sequence[Tensor]],
    *,
    total: int,
    device: torch.device,
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    precision: str = "fp32",
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> CamBatch:
    """The batch loop of :func:`cam_batches`; the result stays on ``device``.

    It never waits for the device: batches go over in pinned memory without blocking
    (:func:`core.engine.to_device`), results are concatenated where they are, and nothing is
    read back — on CUDA the host prepares batch b+1 while the GPU runs batch b. Progress is
    reported per batch *queued*, and cancellation is checked before each batch is preprocessed.
    """
    parts: list[CamBatch] = []
    done = 0
    for chunk in _checked(chunks, should_stop):
        inputs = to_device(chunk, device)
        parts.append(extractor(inputs, classes=classes, top_k=top_k, precision=precision))
        done += len(chunk)
        report(progress, Progress(done / max(total, 1), "cam", f"{done}/{total} images"))
    if not parts:
        raise InputError("no images to explain", field="images")
    return CamBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in _BATCH_FIELDS))


_BATCH_FIELDS = ("logits", "probabilities", "targets", "maps")


def _checked(
    chunks: Iterable[Sequence[Tensor]], should_stop: ShouldStop | None
) -> Iterator[Sequence[Tensor]]:
    # Checked before a chunk is preprocessed, so cancelling skips that work too.
    iterator = iter(chunks)
    while True:
        check_stop(should_stop, "cam")
        chunk = next(iterator, None)
        if chunk is None:
            return
        yield chunk


def _explain_one(
    batch: CamBatch,
    i: int,
    name: str,
    size: tuple[int, int],
    class_names: Sequence[str],
    options: CamOptions,
) -> Explanation:
    width, height = size
    probabilities = batch.probabilities[i]
    k = min(options.top_k, probabilities.numel())
    top = probabilities.topk(k)
    top_k = [
        _score(class_names, int(c), p)
        for c, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]
    raw = batch.maps[i]
    maps = normalize(upsample(raw, (height, width)), relu=options.relu).numpy()
    cams, masks = [], []
    for t, cls in enumerate(batch.targets[i].tolist()):
        har = highest_activation_regions(
            maps[t],
            threshold=options.har_threshold,
            all_components=options.har_all_components,
            min_area=options.har_min_area,
        )
        cams.append(
            ClassCam(
                target=_score(class_names, cls, float(probabilities[cls])),
                method=options.method,
                threshold=options.har_threshold,
                boxes=har.boxes,
                map_min=float(raw[t].min()),
                map_max=float(raw[t].max()),
            )
        )
        masks.append(har.mask)
    result = ImageCam(
        image=name, width=width, height=height, prediction=top_k[0], top_k=top_k, cams=cams
    )
    raw_maps = [m.astype(np.float32) for m in raw.numpy()]
    return Explanation(result=result, maps=list(maps), raw_maps=raw_maps, masks=masks)


def write_artifacts(
    explanation: Explanation,
    image: Image.Image,
    out_dir: str | Path,
    options: CamOptions,
    *,
    prefix: str = "",
    write_mask: bool = True,
) -> ImageCam:
    """Render and save one explained image under ``out_dir`` and return its result with
    ``artifacts`` filled (file names relative to ``out_dir``).

    Per explained class: ``<prefix><stem>_<class>_overlay.png`` (colormap over the image, HAR
    boxes drawn), ``..._map.npy`` (raw float32 map, feature resolution), ``..._map16.png``
    (normalized map, 16-bit, image size) and, with ``write_mask``, ``..._mask.png``; then
    ``<prefix><stem>.json``, the :class:`ImageCam`. Names derived from the image name, the class
    names and ``prefix`` are sanitized by :func:`safe_name`, so they cannot leave ``out_dir``.
    """
    result = explanation.result
    if image.size != (result.width, result.height):
        raise InputError(
            f"image is {image.width}×{image.height}, the result is for "
            f"{result.width}×{result.height}",
            field="image",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_name(Path(_basename(result.image)).stem or result.image, default="image")
    base = safe_name(prefix, default="") + stem
    cams: list[ClassCam] = []
    used: set[str] = set()
    for cam, norm, raw, mask in zip(
        result.cams, explanation.maps, explanation.raw_maps, explanation.masks, strict=True
    ):
        label = safe_name(cam.target.label, default="class")
        if label in used:  # two class names that sanitize alike
            label = f"{label}-{cam.target.index}"
        used.add(label)
        files = {
            "overlay": f"{base}_{label}_overlay.png",
            "map_npy": f"{base}_{label}_map.npy",
            "map_png16": f"{base}_{label}_map16.png",
        }
        picture = overlay(
            image, norm, colormap=options.colormap, alpha=options.alpha, boxes=cam.boxes
        )
        picture.save(out / files["overlay"], format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        save_map_npy(raw, out / files["map_npy"])
        save_map_png16(norm, out / files["map_png16"])
        if write_mask:
            files["mask"] = f"{base}_{label}_mask.png"
            save_mask_png(mask, out / files["mask"])
        cams.append(cam.model_copy(update={"artifacts": files}))
    filled = result.model_copy(update={"cams": cams})
    (out / f"{base}.json").write_text(filled.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return filled


def safe_name(text: str, *, default: str) -> str:
    """A file-name fragment from untrusted ``text``: the last path component only (``/`` and
    ``\\`` both separate), ASCII letters, digits, ``.``, ``_`` and ``-`` kept, other runs replaced
    by ``_``, no leading dot (no ``..``, no hidden files), at most 80 characters."""
    cleaned = _UNSAFE_CHARS.sub("_", _basename(text))
    cleaned = re.sub(r"\.{2,}", ".", cleaned).lstrip(".")
    return cleaned[:_MAX_NAME_CHARS] or default


def _basename(text: str) -> str:
    return re.split(r"[\\/]", text)[-1]


def _score(class_names: Sequence[str], index: int, probability: float) -> ClassScore:
    # float32 softmax can overshoot 1 by an ulp; the schema says [0, 1].
    return ClassScore(
        label=class_names[index], index=index, probability=min(max(probability, 0.0), 1.0)
    )


def _check_images(images: Sequence[tuple[str, Image.Image]]) -> None:
    for position, item in enumerate(images):
        name, image = item
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"image {position} has no name", field="images")
        if not isinstance(image, Image.Image):
            raise InputError(f"image {name!r} is not a decoded PIL image", field="images")


def _device_of(model: nn.Module) -> torch.device:
    first: Tensor | None = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
