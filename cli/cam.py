"""``camres cam``: explain images with a checkpoint on this machine, no server needed.

Per image and explained class it writes the overlay PNG, the raw map (``.npy``, 16-bit PNG)
and the HAR mask, plus one JSON result per image (:class:`core.results.ImageCam`), and prints a
one-line summary. Bad input — an unreadable image, an unknown class, a file that is not a
checkpoint — surfaces as a :class:`core.exceptions.CamresError`, which ``cli.main`` turns into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from cli.params import OUT_DIR, validated
from core.cam_options import CamMethodName, CamOptions, CamPrecisionName, ColormapName
from core.exceptions import CamresError
from core.results import ImageCam

__all__ = ["cam"]


#: CamOptions fields whose command-line option is not ``--field-name``.
_OPTION_NAMES = {
    "classes": "--class",
    "har_threshold": "--threshold",
    "har_all_components": "--all-components",
    "har_min_area": "--min-area",
}


@click.command("cam")
@click.option(
    "--model",
    "checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="camres checkpoint (.safetensors).",
)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=OUT_DIR,
    help="Output folder (created if missing).",
)
@click.option(
    "--method",
    type=click.Choice(typing.get_args(CamMethodName)),
    default="cam",
    show_default=True,
    help="cam: exact CAM (Eq. 1); gradcam: Grad-CAM.",
)
@click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="NAME",
    help="Explain this class (repeatable); default: the top-k predicted classes.",
)
@click.option("--top-k", type=int, default=None, help="Explain the k best classes [default: 1].")
@click.option(
    "--threshold",
    type=float,
    default=0.2,
    show_default=True,
    help="HAR threshold, fraction of the map's maximum.",
)
@click.option(
    "--all-components", is_flag=True, help="Report every HAR component, not only the largest."
)
@click.option(
    "--min-area",
    type=float,
    default=0.0,
    show_default=True,
    help="With --all-components: smallest component, fraction of the image area.",
)
@click.option(
    "--colormap",
    type=click.Choice(typing.get_args(ColormapName)),
    default="jet",
    show_default=True,
)
@click.option(
    "--alpha", type=float, default=0.5, show_default=True, help="Heatmap opacity in the overlay."
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(typing.get_args(CamPrecisionName)),
    default="fp32",
    show_default=True,
    help="Forward-pass precision: bf16 (CPU, CUDA) or fp16 (CUDA) autocast; maps stay float32.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads [default: $CAMRES_THREADS, else the cores this process may use].",
)
def cam(
    checkpoint: Path,
    images: tuple[Path, ...],
    out_dir: Path,
    method: str,
    classes: tuple[str, ...],
    top_k: int | None,
    threshold: float,
    all_components: bool,
    min_area: float,
    colormap: str,
    alpha: float,
    device: str,
    batch_size: int,
    precision: str,
    threads: int | None,
) -> None:
    """Write CAM overlays, raw maps and HAR boxes for IMAGE... with a checkpoint.

    Every image is decoded before anything is computed, so a bad file stops the run early.
    """
    options = validated(
        CamOptions,
        _OPTION_NAMES,
        method=method,
        classes=list(classes) or None,
        top_k=top_k,
        har_threshold=threshold,
        har_all_components=all_components,
        har_min_area=min_area,
        colormap=colormap,
        alpha=alpha,
        precision=precision,
    )
    torch_device = _device(device)

    # Imported here: `camres --help` and the other commands must not pay for torch.
    from core.cam import resolve_classes
    from core.checkpoint import load_model
    from core.engine import THREADS_ENV, apply_thread_policy, autocast_dtype
    from core.explain import explain, write_artifacts
    from core.images import decode_image

    apply_thread_policy(override=threads if threads is not None else os.environ.get(THREADS_ENV))
    try:
        autocast_dtype(precision, torch_device)
    except CamresError as exc:
        raise click.BadParameter(str(exc), param_hint="--precision") from None

    model, ckpt = load_model(checkpoint, device=torch_device)
    if options.classes is not None:
        resolve_classes(options.classes, ckpt.meta.classes)
    named = list(zip(_unique_names(images), images, strict=True))
    for _, path in named:  # fail before writing anything; images are decoded again below
        decode_image(path, name=str(path))
    for chunk in _chunks(named, batch_size):
        decoded = [(name, decode_image(path, name=str(path))) for name, path in chunk]
        explanations = explain(
            model, ckpt.meta, decoded, options, device=torch_device, batch_size=batch_size
        )
        for (_, image), (_, path), explanation in zip(decoded, chunk, explanations, strict=True):
            result = write_artifacts(explanation, image, out_dir, options)
            click.echo(_summary(path, result))


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"not a torch device: {name!r}", param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return device


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File names as image names, with ``-2``, ``-3`` ... added where two would give the same
    output files (``x.jpg`` in two folders, ``x.jpg`` and ``x.tif``), so none is overwritten."""
    from core.explain import safe_name

    used: set[str] = set()
    names = []
    for path in paths:
        name, n = path.name, 1
        # Output names derive from the sanitized stem; compare those, case-insensitively.
        while (key := safe_name(Path(name).stem, default="image").lower()) in used:
            n += 1
            name = f"{path.stem}-{n}{path.suffix}"
        used.add(key)
        names.append(name)
    return names


def _chunks(items: list[tuple[str, Path]], size: int) -> Iterator[list[tuple[str, Path]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _summary(path: Path, result: ImageCam) -> str:
    pred = result.prediction
    parts = [f"{path}: {pred.label} ({pred.probability:.3f})"]
    for item in result.cams:
        if item.boxes:
            b = item.boxes[0]
            where = f"[{b.x0},{b.y0},{b.x1},{b.y1}] share {b.activation_share:.2f}"
            extra = f" +{len(item.boxes) - 1}" if len(item.boxes) > 1 else ""
        else:
            where, extra = "no region", ""
        parts.append(f"{item.target.label}: {where}{extra} → {item.artifacts['overlay']}")
    return " | ".join(parts)
