"""Save and load camres checkpoints: safetensors files, never pickles.

A checkpoint holds a model's ``state_dict``, its :class:`~core.checkpoint_meta.CheckpointMeta`
(architecture, class list, preprocessing, provenance, lineage, damage) in the safetensors
header, and optionally the damage masks of a damaged or retrained model as boolean tensors under
:data:`~core.checkpoint_meta.MASK_PREFIX`. Every load validates the header in pure Python first
(:func:`~core.checkpoint_meta.read_meta`), so a pickle is rejected before any loader sees it,
and :func:`load_model` checks that the tensors really are the named architecture with one output
per class before building it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from safetensors import SafetensorError
from torch import Tensor, nn

from core.checkpoint_meta import (
    MASK_PREFIX,
    META_KEY,
    CheckpointMeta,
    bytes_digest,
    file_digest,
    read_meta,
)
from core.exceptions import CheckpointError, UnknownArchitectureError
from core.models import build_model, get_arch

__all__ = [
    "Checkpoint",
    "check_weights",
    "import_state_dict",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``damage_masks`` maps parameter names to bool tensors (True =
    damaged); ``digest`` is the ``"sha256:<hex>"`` of the file it was read from."""

    meta: CheckpointMeta
    state_dict: dict[str, Tensor]
    damage_masks: dict[str, Tensor] = field(default_factory=dict)
    digest: str | None = None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: CheckpointMeta,
    *,
    damage_masks: Mapping[str, Tensor] | None = None,
) -> str:
    """Write ``model``'s weights, ``meta`` and ``damage_masks`` to ``path`` atomically and return
    the file's digest.

    ``meta.has_damage_masks`` is set from ``damage_masks``, and the provenance gains
    ``created_at`` and the camres/torch/torchvision versions (other provenance keys are kept).
    :class:`CheckpointError` when the weights do not fit ``meta.arch`` and ``meta.classes``.
    """
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    check_weights(meta.arch, len(meta.classes), state)
    masks = _checked_masks(damage_masks or {}, state)
    meta = meta.model_copy(
        update={
            "has_damage_masks": bool(masks),
            "provenance": {**meta.provenance, **_runtime_provenance()},
        }
    )
    tensors = {**state, **{MASK_PREFIX + name: mask for name, mask in masks.items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={META_KEY: meta.model_dump_json()})
        os.replace(tmp, path)  # readers never see a half-written checkpoint
    finally:
        tmp.unlink(missing_ok=True)
    return file_digest(path)


def load_checkpoint(source: str | Path | bytes) -> Checkpoint:
    """Read a checkpoint from a path or its bytes. Never unpickles: the header is validated in
    pure Python first and the tensors are read by safetensors. :class:`CheckpointError` for
    anything that is not a consistent camres checkpoint."""
    meta = read_meta(source)
    try:
        if isinstance(source, bytes):
            tensors = safetensors.torch.load(source)
        else:
            tensors = safetensors.torch.load_file(source, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint tensors: {exc}", field="checkpoint") from exc
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    masks = {
        k[len(MASK_PREFIX) :]: v.to(torch.bool)
        for k, v in tensors.items()
        if k.startswith(MASK_PREFIX)
    }
    digest = bytes_digest(source) if isinstance(source, bytes) else file_digest(source)
    return Checkpoint(meta=meta, state_dict=state, damage_masks=masks, digest=digest)


def load_model(
    source: str | Path | bytes, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model of a checkpoint, in eval mode on ``device``.

    The architecture is built as ``build_model(meta.arch, len(meta.classes))`` and loaded
    strictly; :class:`CheckpointError` when the architecture is unknown or the tensors contradict
    it. The model owns its own copy of the weights (``checkpoint.state_dict`` is not aliased).
    """
    ckpt = load_checkpoint(source)
    meta = ckpt.meta
    check_weights(meta.arch, len(meta.classes), ckpt.state_dict)
    model = _instantiate(meta.arch, len(meta.classes), ckpt.state_dict, torch.device(device))
    return model.eval(), ckpt


def check_weights(arch: str, num_classes: int, state_dict: Mapping[str, Tensor]) -> None:
    """:class:`CheckpointError` unless ``state_dict`` has exactly the tensor names and shapes of
    ``build_model(arch, num_classes)``. Built on the meta device: no memory, no initialisation."""
    try:
        spec = get_arch(arch)
    except UnknownArchitectureError as exc:
        raise CheckpointError(f"checkpoint names an {exc}", field="arch") from exc
    head = f"{spec.logits_layer}.weight"
    if head in state_dict and state_dict[head].ndim == 2 and len(state_dict[head]) != num_classes:
        raise CheckpointError(
            f"inconsistent checkpoint: {head} has {len(state_dict[head])} outputs but the "
            f"metadata lists {num_classes} classes",
            field="classes",
        )
    expected = {k: (tuple(v.shape), v.dtype) for k, v in _skeleton(arch, num_classes).items()}
    problems = _compare(expected, state_dict)
    if problems:
        raise CheckpointError(
            f"the weights are not a {arch} with {num_classes} classes: " + "; ".join(problems),
            field="arch",
        )


def _skeleton(arch: str, num_classes: int) -> dict[str, Tensor]:
    """The state_dict of ``arch`` as shapes only (meta tensors) when the builder allows it."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes).state_dict()
    except (NotImplementedError, RuntimeError):  # a builder that computes with tensors
        return build_model(arch, num_classes).state_dict()


def _compare(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], state: Mapping[str, Tensor]
) -> list[str]:
    def sample(names: set[str]) -> str:
        shown = sorted(names)[:3]
        return ", ".join(shown) + (", ..." if len(names) > 3 else "")

    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    reshaped = {
        k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k][0]
    }
    retyped = {
        k for k in expected.keys() & state.keys() if not _compatible(state[k].dtype, expected[k][1])
    }
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({sample(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({sample(unexpected)})")
    for name in sorted(reshaped)[:3]:
        got, want = tuple(state[name].shape), expected[name][0]
        problems.append(f"{name} has shape {got}, expected {want}")
    if len(reshaped) > 3:
        problems.append(f"{len(reshaped) - 3} more tensors with other shapes")
    if retyped:
        problems.append(f"{len(retyped)} tensors of an incompatible dtype ({sample(retyped)})")
    return problems


def _compatible(got: torch.dtype, want: torch.dtype) -> bool:
    # Half-precision exports are accepted (cast on load); integers must match exactly.
    return got == want or (got.is_floating_point and want.is_floating_point)


def _instantiate(
    arch: str, num_classes: int, state: Mapping[str, Tensor], device: torch.device
) -> nn.Module:
    # Build on the meta device and adopt the checkpoint's tensors (assign=True): no random
    # initialisation of weights that are overwritten anyway. ``.to(copy=True)`` gives the model
    # its own tensors even on the CPU.
    owned = {k: v.to(device=device, copy=True) for k, v in state.items()}
    try:
        with torch.device("meta"):
            model = build_model(arch, num_classes)
        model.load_state_dict(owned, strict=True, assign=True)
    except (NotImplementedError, RuntimeError):
        model = build_model(arch, num_classes)
        model.load_state_dict(owned, strict=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_model(arch, num_classes)  # a non-persistent buffer was left unset
        model.load_state_dict(owned, strict=True)
    # Half-precision exports are cast to the architecture's float32 here.
    return model.to(device=device, dtype=torch.float32)


def _checked_masks(masks: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    checked = {}
    for name, mask in masks.items():
        if name not in state:
            raise CheckpointError(f"damage mask for unknown tensor {name!r}", field="damage_masks")
        if mask.dtype not in (torch.bool, torch.uint8):
            raise CheckpointError(
                f"damage mask {name!r} must be a bool tensor, got {mask.dtype}",
                field="damage_masks",
            )
        if tuple(mask.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"damage mask {name!r} has shape {tuple(mask.shape)}, "
                f"the tensor {tuple(state[name].shape)}",
                field="damage_masks",
            )
        checked[name] = mask.detach().to(device="cpu", dtype=torch.bool).contiguous()
    return checked


def _runtime_provenance() -> dict[str, Any]:
    try:
        version = importlib_metadata.version("camres")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "camres_version": version,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }


def import_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a plain ``.pt``/``.pth`` state dict, e.g. to convert it to a camres checkpoint.

    Uses ``torch.load(weights_only=True)``: torch's restricted unpickler, which only rebuilds
    tensors and plain containers and refuses any other object. A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and DataParallel's ``module.`` prefix are removed.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; all mean "not importable"
        raise CheckpointError(
            f"cannot import {str(path)!r} as a state dict: {exc}", field="path"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{str(path)!r} is not a name → tensor state dict", field="path")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded
