"""Fault models: registry, and the exact effect of each fault on a weight tensor."""

from __future__ import annotations

import pytest
import torch

from core.damage_spec import BitFlip, DamageSpec, Gaussian, StuckAt
from core.exceptions import DamageSpecError, UnknownFaultModelError
from core.faults import FAULT_MODELS, fault_model


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flipped_bits(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per entry, a (…, 32) bool tensor of the float32 bits that differ."""
    xor = before.view(torch.int32) ^ after.view(torch.int32)
    return torch.stack([(xor >> b) & 1 for b in range(32)], dim=-1).bool()


def test_registry_names_are_the_spec_kinds() -> None:
    assert FAULT_MODELS.names() == sorted([StuckAt().kind, BitFlip().kind, Gaussian().kind])


def test_unknown_fault_model_names_the_field() -> None:
    with pytest.raises(UnknownFaultModelError) as info:
        FAULT_MODELS.get("melt")
    assert info.value.field == "fault.kind"
    assert "stuck_at" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_default_spec_is_the_papers_stuck_at_zero() -> None:
    spec = DamageSpec(fraction=0.5)
    model = fault_model(spec.fault)
    weight = torch.randn(8, 3, 3, 3)
    assert torch.equal(model.corrupt(weight, _generator()), torch.zeros_like(weight))


def test_stuck_at_value_leaves_input_alone() -> None:
    weight = torch.randn(4, 5)
    original = weight.clone()
    out = fault_model(StuckAt(value=-1.5)).corrupt(weight, _generator())
    assert out.shape == weight.shape
    assert out.dtype == weight.dtype
    assert torch.equal(out, torch.full_like(weight, -1.5))
    assert torch.equal(weight, original)


def test_bit_flip_changes_exactly_one_bit_per_weight() -> None:
    weight = torch.randn(64, 32, 3, 3)
    original = weight.clone()
    out = fault_model(BitFlip()).corrupt(weight, _generator())
    flipped = _flipped_bits(weight, out)
    assert torch.equal(flipped.sum(-1), torch.ones(weight.shape, dtype=torch.long))
    # Without `bits`, every position (mantissa, exponent and sign) gets drawn.
    assert flipped.flatten(0, -2).any(0).all()
    assert torch.equal(weight, original)


def test_bit_flip_only_flips_the_listed_bits() -> None:
    weight = torch.randn(1000)
    out = fault_model(BitFlip(bits=[3, 31])).corrupt(weight, _generator())
    positions = _flipped_bits(weight, out).nonzero()[:, -1]
    assert set(positions.tolist()) == {3, 31}
    sign_flipped = positions == 31
    assert torch.equal(out[sign_flipped], -weight[sign_flipped])


def test_bit_flip_is_reproducible_from_the_generator() -> None:
    weight = torch.randn(256)
    model = fault_model(BitFlip())
    first = model.corrupt(weight, _generator(7)).view(torch.int32)
    assert torch.equal(first, model.corrupt(weight, _generator(7)).view(torch.int32))
    assert not torch.equal(first, model.corrupt(weight, _generator(8)).view(torch.int32))


def test_bit_flip_refuses_non_float32_weights() -> None:
    with pytest.raises(DamageSpecError) as info:
        fault_model(BitFlip()).corrupt(torch.randn(4, dtype=torch.float64), _generator())
    assert info.value.field == "fault"


def test_gaussian_noise_is_scaled_to_the_layer_spread() -> None:
    weight = torch.randn(200_000, generator=_generator(1)) * 0.02 + 0.3
    out = fault_model(Gaussian(sigma=0.5)).corrupt(weight, _generator())
    noise = out - weight
    expected_std = 0.5 * weight.std(correction=0).item()
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(noise.mean().item()) < 0.02 * expected_std


def test_gaussian_of_a_single_weight_is_finite() -> None:
    weight = torch.tensor([0.7])
    assert torch.equal(fault_model(Gaussian()).corrupt(weight, _generator()), weight)
