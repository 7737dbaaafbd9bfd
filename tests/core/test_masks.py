"""Seeded damage masks: the permutation cache and the parallel draw give the very masks a fresh,
sequential draw gives, and the cache stays within its byte budget."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from core.masks import PERMUTATIONS, damaged_count, layer_masks, seeded_generator

CONV1 = [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]


@pytest.fixture
def model() -> nn.Module:
    return resnet18(num_classes=4)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    PERMUTATIONS.clear()
    yield
    PERMUTATIONS.clear()


def _reference_mask(weight: torch.Tensor, fraction: float, seed: int, layer: str) -> torch.Tensor:
    """The definition, drawn directly: the first round(D·N) entries of the seeded permutation."""
    order = torch.randperm(weight.numel(), generator=seeded_generator(seed, "mask", layer))
    flat = torch.zeros(weight.numel(), dtype=torch.bool)
    flat[order[: damaged_count(weight.numel(), fraction)]] = True
    return flat.view(weight.shape)


def test_masks_follow_the_seeded_permutation(model: nn.Module) -> None:
    masks = layer_masks(model, CONV1, 0.35, seed=5)
    for name in CONV1:
        weight = model.get_parameter(f"{name}.weight")
        assert torch.equal(masks[f"{name}.weight"], _reference_mask(weight, 0.35, 5, name))


def test_cached_permutations_give_the_same_masks_as_fresh_ones(model: nn.Module) -> None:
    first = layer_masks(model, CONV1, 0.5, seed=1)
    assert len(PERMUTATIONS.keys()) == len(CONV1)
    again = layer_masks(model, CONV1, 0.5, seed=1)  # every permutation from the cache
    PERMUTATIONS.clear()
    fresh = layer_masks(model, CONV1, 0.5, seed=1)
    for name in first:
        assert torch.equal(first[name], again[name])
        assert torch.equal(first[name], fresh[name])


def test_cached_permutations_are_not_changed_by_masking(model: nn.Module) -> None:
    layer_masks(model, ["layer1.0.conv1"], 0.9, seed=2)
    (key,) = PERMUTATIONS.keys()
    order = PERMUTATIONS.get(key)
    assert order is not None
    kept = order.clone()
    layer_masks(model, ["layer1.0.conv1"], 0.1, seed=2)
    assert torch.equal(order, kept)
    assert torch.equal(torch.sort(order.long()).values, torch.arange(order.numel()))


def test_parallel_draw_equals_sequential_draw(model: nn.Module) -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = layer_masks(model, CONV1, 0.6, seed=9)
        PERMUTATIONS.clear()
        torch.set_num_threads(4)  # more threads than cores is fine: the draws are independent
        parallel = layer_masks(model, CONV1, 0.6, seed=9)
    finally:
        torch.set_num_threads(threads)
    for name in sequential:
        assert torch.equal(sequential[name], parallel[name])


def test_the_cache_evicts_least_recently_used_within_its_budget(model: nn.Module) -> None:
    budget = PERMUTATIONS.max_bytes
    numel = model.get_parameter("layer1.0.conv1.weight").numel()  # 36 864 int32 = 144 KiB
    try:
        PERMUTATIONS.max_bytes = 2 * numel * 4
        layer_masks(model, ["layer1.0.conv1"], 0.5, seed=0)
        layer_masks(model, ["layer1.1.conv1"], 0.5, seed=0)
        layer_masks(model, ["layer1.0.conv1"], 0.5, seed=0)  # touch: now most recent
        layer_masks(model, ["layer1.0.conv1"], 0.5, seed=1)  # evicts layer1.1.conv1
        assert PERMUTATIONS.keys() == [
            (0, "layer1.0.conv1", numel),
            (1, "layer1.0.conv1", numel),
        ]
        assert PERMUTATIONS.nbytes == 2 * numel * 4
        PERMUTATIONS.max_bytes = numel * 4 - 1  # one permutation alone is over budget: not kept
        PERMUTATIONS.clear()
        layer_masks(model, ["layer1.0.conv1"], 0.5, seed=0)
        assert not PERMUTATIONS.keys()
    finally:
        PERMUTATIONS.max_bytes = budget
