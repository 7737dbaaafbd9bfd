from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from core.exceptions import UnsupportedModelError
from core.hooks import capture_output, eval_mode, get_submodule, preserved_mode


class Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Dropout(0.5)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name


def test_capture_output_records_the_layer_output_and_removes_its_hook() -> None:
    model = small_net().eval()
    x = torch.randn(2, 3, 8, 8)
    with capture_output(model[3]) as captured:
        model(x)
        assert model[3]._forward_hooks
    expected = model[3](model[2](model[1](model[0](x))))
    torch.testing.assert_close(captured.value, expected)
    assert_no_hooks(model)


def test_capture_output_removes_its_hook_when_the_forward_raises() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Boom())
    with pytest.raises(RuntimeError, match="boom"), capture_output(model[0]):
        model(torch.randn(1, 3, 4, 4))
    assert_no_hooks(model)


def test_captured_value_before_any_forward_is_an_error() -> None:
    with capture_output(nn.Identity()) as captured, pytest.raises(UnsupportedModelError):
        _ = captured.value


def test_a_layer_returning_a_tuple_cannot_be_captured() -> None:
    model = nn.Sequential(Pair())
    with (
        pytest.raises(UnsupportedModelError, match="tuple"),
        capture_output(model[0]),
    ):
        model(torch.randn(1, 3))
    assert_no_hooks(model)


def test_leaf_capture_allows_gradients_with_frozen_parameters() -> None:
    model = small_net().eval().requires_grad_(False)
    with torch.enable_grad(), capture_output(model[3], as_leaf=True) as captured:
        out = model(torch.randn(2, 3, 8, 8))
    features = captured.value
    assert features.is_leaf
    assert features.requires_grad
    (grad,) = torch.autograd.grad(out[:, 0].sum(), features)
    # d(mean-pooled linear)/d(features) is w_0^k / (h·w) at every position.
    head = model[6]
    assert isinstance(head, nn.Linear)
    expected = (head.weight[0] / 64).view(1, 4, 1, 1).expand_as(grad)
    torch.testing.assert_close(grad, expected)
    assert all(p.grad is None for p in model.parameters())


def test_preserved_mode_restores_mixed_flags() -> None:
    model = small_net().train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_preserved_mode_restores_flags_when_the_block_raises() -> None:
    model = small_net().eval()
    model.get_submodule("3.1").train()
    before = [m.training for m in model.modules()]
    seen: list[bool] = []

    def fail() -> None:
        with preserved_mode(model, train=True):
            seen.extend(m.training for m in model.modules())
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fail()
    assert all(seen)
    assert [m.training for m in model.modules()] == before


def test_get_submodule_names_the_field_at_fault() -> None:
    model = small_net()
    assert get_submodule(model, "3.0") is model.get_submodule("3").get_submodule("0")
    with pytest.raises(UnsupportedModelError) as info:
        get_submodule(model, "layer4", field="feature_layer")
    assert info.value.field == "feature_layer"
