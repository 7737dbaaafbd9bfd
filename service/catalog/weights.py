"""What the gateway can tell about a checkpoint's tensors from its safetensors header, without
torch: whether they are the architecture and class count its metadata claims, and which
modules a damage spec's targets select.

The worker checks a checkpoint completely when it loads it (:func:`core.checkpoint.check_weights`
builds the model on the meta device); these checks refuse at upload what would fail there, so a
client learns at once, and they never refuse what the worker would accept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatchcase

from core.checkpoint_meta import MASK_PREFIX, CheckpointMeta, SafetensorsHeader
from core.damage_spec import DamageSpec
from core.exceptions import CheckpointError


@dataclass(frozen=True)
class ArchSignature:
    """An architecture's tensors: the logits layer (replaced for a new class list), its input
    features, and a digest of the names and shapes of every other tensor."""

    head: str
    in_features: int
    body_digest: str


#: The architectures of :data:`core.models.ARCHITECTURES` (a test rebuilds every one on the
#: meta device and keeps this table equal; it prints the new table when they differ).
SIGNATURES: dict[str, ArchSignature] = {
    "efficientnet_b0": ArchSignature("classifier.1", 1280, "d801738d71f68510"),
    "mobilenet_v3_small": ArchSignature("classifier.3", 1024, "7db5d2296f8f8673"),
    "resnet101": ArchSignature("fc", 2048, "bd6b6e2117cf74b1"),
    "resnet152": ArchSignature("fc", 2048, "1914e82e116b1713"),
    "resnet18": ArchSignature("fc", 512, "d4bd6dd933942dc1"),
    "resnet34": ArchSignature("fc", 512, "561612aaeb7d285d"),
    "resnet50": ArchSignature("fc", 2048, "6248419c8198da76"),
    "resnext101_32x8d": ArchSignature("fc", 2048, "0f4288294101b7d3"),
    "resnext101_64x4d": ArchSignature("fc", 2048, "21f22c0e41bb6b95"),
    "resnext50_32x4d": ArchSignature("fc", 2048, "50009515c9fc00ad"),
    "vgg11": ArchSignature("classifier.6", 4096, "41858fe4ee2f5479"),
    "vgg16": ArchSignature("classifier.6", 4096, "41c9c25c6abfc4d5"),
    "wide_resnet101_2": ArchSignature("fc", 2048, "0044190c7f9168dd"),
    "wide_resnet50_2": ArchSignature("fc", 2048, "ecee3fd66e679f4d"),
}


def body_digest(shapes: dict[str, tuple[int, ...]], head: str) -> str:
    """Digest of the names and shapes of every tensor but the head's (first 16 hex digits)."""
    skip = {f"{head}.weight", f"{head}.bias"}
    lines = sorted(
        f"{name}:{','.join(map(str, shape))}"
        for name, shape in shapes.items()
        if name not in skip and not name.startswith(MASK_PREFIX)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _shapes(header: SafetensorsHeader) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in header.tensors.items()}


def check_tensors(meta: CheckpointMeta, header: SafetensorsHeader) -> None:
    """:class:`CheckpointError` when the tensors contradict the metadata's architecture or
    class list."""
    signature = SIGNATURES.get(meta.arch)
    if signature is None:
        raise CheckpointError(
            f"unknown architecture {meta.arch!r}; known: {', '.join(sorted(SIGNATURES))}",
            field="arch",
        )
    shapes = _shapes(header)
    weight = shapes.get(f"{signature.head}.weight")
    expected = (len(meta.classes), signature.in_features)
    if weight is not None and len(weight) == 2 and weight[0] != expected[0]:
        raise CheckpointError(
            f"inconsistent checkpoint: {signature.head}.weight has {weight[0]} outputs but the "
            f"metadata lists {len(meta.classes)} classes",
            field="classes",
        )
    bias = shapes.get(f"{signature.head}.bias")
    digest = body_digest(shapes, signature.head)
    if weight == expected and bias in (None, (expected[0],)) and digest == signature.body_digest:
        return
    lookalike = [
        name
        for name, other in SIGNATURES.items()
        if other.body_digest == body_digest(shapes, other.head) and name != meta.arch
    ]
    hint = f"; they are those of a {lookalike[0]}" if lookalike else ""
    raise CheckpointError(
        f"the tensors are not those of a {meta.arch} with {len(meta.classes)} classes (names or "
        f"shapes differ{hint})",
        field="arch",
    )


def modules(header: SafetensorsHeader) -> tuple[set[str], set[str]]:
    """Module names of a checkpoint's model as far as its tensors show them: every module
    that owns or contains a tensor, and those owning a ``weight``."""
    every: set[str] = set()
    weighted: set[str] = set()
    for name in header.tensors:
        if name.startswith(MASK_PREFIX):
            continue
        parts = name.split(".")
        every.update(".".join(parts[:i]) for i in range(1, len(parts)))
        if parts[-1] == "weight" and len(parts) > 1:
            weighted.add(".".join(parts[:-1]))
    return every, weighted


def damage_target_error(spec: DamageSpec, header: SafetensorsHeader) -> str | None:
    """Why ``spec.targets`` cannot be applied to the checkpoint, or None.

    Mirrors :func:`core.damage.resolve_targets`: every target must match a module and every
    matched module must own a weight. Modules without tensors (activations, pooling) are
    invisible here, so this refuses only what the worker would refuse too.
    """
    every, weighted = modules(header)
    examples = ", ".join(sorted(weighted)[:8]) + (", …" if len(weighted) > 8 else "")
    for target, pattern in zip(spec.targets, spec.patterns(), strict=True):
        matched = [name for name in every if fnmatchcase(name, pattern)]
        shown = target if pattern == target else f"{target} ({pattern})"
        if not matched:
            return (
                f"damage target {shown!r} matches no module of the model; weighted modules "
                f"include {examples}"
            )
        unweighted = sorted(name for name in matched if name not in weighted)
        if unweighted:
            return (
                f"damage target {shown!r} matches module {unweighted[0]!r}, which has no weight; "
                f"narrow the pattern (weighted modules include {examples})"
            )
    return None
