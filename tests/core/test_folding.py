"""Batch-norm folding (core.folding): the folded view computes the model's eval-mode function,
leaves the model alone, and is remade whenever the model's weights change."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from core.cam import Cam
from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.damage import apply_damage
from core.damage_spec import DamageSpec, StuckAt
from core.engine import prepare_for_inference
from core.explain import explain
from core.folding import conv_bn_pairs, fold_batchnorm, folded_view
from core.models import build_model
from core.preprocessing import Preprocessing

CLASSES = ["a", "b", "c"]


def with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms as training leaves them: a fresh one (mean 0, var 1, γ 1, β 0) folds into
    almost nothing, so it would not test the arithmetic."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.num_features
            assert module.running_mean is not None
            assert module.running_var is not None
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return with_trained_statistics(build_model("resnet18", len(CLASSES)))


@pytest.fixture
def images() -> Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def outputs(net: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return net(x)


def test_every_conv_bn_pair_of_a_resnet_is_found(model: nn.Module) -> None:
    pairs = conv_bn_pairs(model)
    # resnet18: the stem, two per basic block (8 blocks) and three downsample branches
    assert len(pairs) == 1 + 2 * 8 + 3
    assert ("conv1", "bn1") in pairs
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs


def test_folded_copy_matches_eval_mode_and_leaves_the_model_alone(
    model: nn.Module, images: Tensor
) -> None:
    before = copy.deepcopy(model.state_dict())
    model.train()  # the view is the eval-mode function whatever the flag
    folded = fold_batchnorm(model)
    assert model.training
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert isinstance(folded.layer1[0].bn1, nn.Identity)
    assert not folded.training
    assert not any(p.requires_grad for p in folded.parameters())
    expected = outputs(model.eval(), images)
    torch.testing.assert_close(outputs(folded, images), expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(outputs(folded, images), expected)  # it did fold something


def test_channels_last_weights_stay_channels_last(model: nn.Module) -> None:
    folded = fold_batchnorm(prepare_for_inference(model))
    conv = folded.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.bias is not None


class _Shared(nn.Module):
    """A convolution read by two consumers, and a norm called twice: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.conv2(self.bn(y) + y)
        return self.bn2(self.bn2(z))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            x = -x
        return self.bn(self.conv(x))


def test_shared_outputs_and_repeated_calls_are_not_folded(images: Tensor) -> None:
    net = with_trained_statistics(_Shared())
    assert conv_bn_pairs(net) == []
    torch.testing.assert_close(outputs(fold_batchnorm(net), images), outputs(net, images))


def test_a_model_fx_cannot_trace_is_left_unfolded(images: Tensor) -> None:
    net = with_trained_statistics(_Untraceable())
    assert conv_bn_pairs(net) == []
    assert isinstance(fold_batchnorm(net).bn, nn.BatchNorm2d)


def test_view_is_reused_and_refolded_in_place_when_the_weights_change(
    model: nn.Module, images: Tensor
) -> None:
    view = folded_view(model)
    assert folded_view(model) is view
    intact = outputs(view, images)
    # stuck-at-1 does not commute with the BN scale: a stale view would give other outputs
    apply_damage(model, DamageSpec(targets=["D1"], fraction=0.5, fault=StuckAt(value=1.0)))
    assert folded_view(model) is view  # the same modules, the new weights
    expected = outputs(model, images)
    torch.testing.assert_close(outputs(view, images), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outputs(view, images), intact)
    prepare_for_inference(model)  # another memory format: a new view in it
    nhwc = folded_view(model)
    assert nhwc is not view
    assert nhwc.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_pair_that_would_overflow_stays_unfolded(model: nn.Module, images: Tensor) -> None:
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = 3e38  # a flipped exponent bit, say
        model.layer1[0].bn1.weight[0] = 10.0
    view = folded_view(model)
    assert isinstance(view.layer1[0].bn1, nn.BatchNorm2d)
    assert isinstance(view.layer1[0].bn2, nn.Identity)
    torch.testing.assert_close(outputs(view, images), outputs(model, images), equal_nan=True)
    with torch.no_grad():  # a refold that would overflow gives a new view instead
        model.layer1[0].conv2.weight[0, 0, 0, 0] = 3e38
        model.layer1[0].bn2.weight[0] = 10.0
    again = folded_view(model)
    assert again is not view
    assert isinstance(again.layer1[0].bn2, nn.BatchNorm2d)


def test_view_dies_with_its_model() -> None:
    model = build_model("resnet18", len(CLASSES)).eval()  # no fixture holds on to it
    view = weakref.ref(folded_view(model))
    del model
    gc.collect()
    assert view() is None


def test_a_model_of_inference_tensors_is_its_own_view() -> None:
    with torch.inference_mode():
        net = build_model("resnet18", len(CLASSES)).eval()
    assert folded_view(net) is net


def test_explain_runs_the_view_and_keeps_the_models_cams(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    views: list[nn.Module] = []

    def spy(net: nn.Module) -> nn.Module:
        views.append(folded_view(net))
        return views[-1]

    monkeypatch.setattr("core.explain.folded_view", spy)
    meta = CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )
    picture = Image.new("RGB", (80, 64), (120, 60, 30))
    picture.paste((10, 200, 90), (10, 10, 40, 40))
    (result,) = explain(model, meta, [("p", picture)], CamOptions())
    reference = Cam(copy.deepcopy(model), "layer4", "fc")(torch.stack([_preprocess(picture, meta)]))
    prediction = result.result.prediction
    assert prediction.index == int(reference.targets[0, 0])
    assert prediction.probability == pytest.approx(float(reference.probabilities.max()), abs=1e-5)
    raw = torch.from_numpy(result.raw_maps[0])
    torch.testing.assert_close(raw, reference.maps[0, 0], rtol=1e-4, atol=1e-4)
    assert len(views) == 1
    assert isinstance(views[0].bn1, nn.Identity)
    # the original model got no hooks and no copies of its own modules replaced
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert not model.layer4._forward_hooks


def _preprocess(picture: Image.Image, meta: CheckpointMeta) -> Tensor:
    from core.transforms import eval_transform

    return eval_transform(meta.preprocessing)(picture)
