"""The gateway's torch-free checks of checkpoint tensors agree with the core's torch checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.checkpoint_meta import read_header
from core.damage import resolve_targets
from core.damage_spec import DamageSpec
from core.exceptions import DamageSpecError
from core.models import ARCHITECTURES, build_model, get_arch
from service.catalog.weights import SIGNATURES, ArchSignature, body_digest, damage_target_error


def core_signature(arch: str) -> ArchSignature:
    spec = get_arch(arch)
    with torch.device("meta"):
        state = build_model(arch, 7).state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    head = spec.logits_layer
    return ArchSignature(head, shapes[f"{head}.weight"][1], body_digest(shapes, head))


def test_signatures_match_every_core_architecture() -> None:
    expected = {arch: core_signature(arch) for arch in sorted(ARCHITECTURES.names())}
    table = "\n".join(
        f'    "{arch}": ArchSignature("{s.head}", {s.in_features}, "{s.body_digest}"),'
        for arch, s in expected.items()
    )
    assert expected == SIGNATURES, f"update SIGNATURES in service/catalog/weights.py to:\n{table}"


@pytest.mark.parametrize(
    "targets",
    [["D1", "D4"], ["layer4.1.conv2", "fc"], ["layer9.*"], ["layer4"], ["layer3.*"], ["bn1"]],
)
def test_damage_targets_are_judged_as_the_core_judges_them(
    tiny_checkpoint: Path, targets: list[str]
) -> None:
    spec = DamageSpec(targets=targets, fraction=0.1)
    model = build_model("resnet18", 3)
    try:
        resolve_targets(model, spec)
        core_error = None
    except DamageSpecError as exc:
        core_error = exc.message
    gateway_error = damage_target_error(spec, read_header(tiny_checkpoint))
    assert (gateway_error is None) == (core_error is None), (gateway_error, core_error)
