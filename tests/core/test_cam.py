from __future__ import annotations

import copy
import typing

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import Tensor, nn

from core.cam import (
    CAM_METHODS,
    Cam,
    CamBatch,
    GradCam,
    compute_cams,
    normalize,
    resolve_classes,
    select_targets,
    upsample,
)
from core.cam_options import CamMethodName, CamOptions, CamPrecisionName
from core.engine import PRECISIONS, is_channels_last, prepare_for_inference
from core.exceptions import (
    InputError,
    UnknownCamMethodError,
    UnknownClassError,
    UnsupportedModelError,
)

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet(images: Tensor) -> torchvision.models.ResNet:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    # Untrained features share one dominant direction, so every image would get the same
    # ranking; a head orthogonal to it lets the test images get different predictions.
    with torch.no_grad():
        common = layer4_features(model, images).mean(dim=(0, 2, 3))
        common /= common.norm()
        weight = torch.randn(NUM_CLASSES, common.numel())
        model.fc.weight.copy_(weight - torch.outer(weight @ common, common))
        nn.init.normal_(model.fc.bias, std=0.1)
    return model


def layer4_features(model: nn.Module, x: Tensor) -> Tensor:
    """ResNet features by hand, without hooks: the f^k of Eq. 1."""
    m = typing.cast(torchvision.models.ResNet, model)
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def run(model: nn.Module, x: Tensor, method: str = "cam", **kwargs: typing.Any) -> CamBatch:
    return compute_cams(model, x, feature_layer="layer4", fc_layer="fc", method=method, **kwargs)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name


def test_registry_holds_exactly_the_documented_methods() -> None:
    assert CAM_METHODS.names() == sorted(typing.get_args(CamMethodName))
    assert CAM_METHODS.get("cam") is Cam
    assert CAM_METHODS.get("gradcam") is GradCam
    with pytest.raises(UnknownCamMethodError) as info:
        CAM_METHODS.get("scorecam")
    assert info.value.field == "method"


def test_cam_is_eq1_on_the_fc_weights(resnet: torchvision.models.ResNet, images: Tensor) -> None:
    batch = run(resnet, images, top_k=2)
    with torch.no_grad():
        features = layer4_features(resnet, images)
        logits = resnet(images)
    torch.testing.assert_close(batch.logits, logits)
    torch.testing.assert_close(batch.probabilities, logits.softmax(1))
    assert batch.maps.shape == (3, 2, 3, 3)
    for n in range(3):
        for t in range(2):
            c = int(batch.targets[n, t])
            expected = torch.einsum("k,khw->hw", resnet.fc.weight[c].detach(), features[n])
            torch.testing.assert_close(batch.maps[n, t], expected, rtol=1e-4, atol=1e-5)


def test_cam_mean_plus_bias_is_the_logit(resnet: torchvision.models.ResNet, images: Tensor) -> None:
    # GAP → fc: y_c = mean F_c + b_c; the bias is the only part not in the map.
    batch = run(resnet, images, classes=list(range(NUM_CLASSES)))
    recovered = batch.maps.mean(dim=(2, 3)) + resnet.fc.bias.detach()
    torch.testing.assert_close(recovered, batch.logits, rtol=1e-4, atol=1e-4)


def test_top_k_targets_are_each_images_best_classes(
    resnet: torchvision.models.ResNet, images: Tensor
) -> None:
    batch = run(resnet, images, top_k=3)
    torch.testing.assert_close(batch.targets, batch.logits.topk(3, dim=1).indices)
    assert len({tuple(row.tolist()) for row in batch.targets}) > 1  # predictions differ
    assert run(resnet, images, top_k=50).targets.shape == (3, NUM_CLASSES)


def test_named_classes_are_explained_for_every_image(
    resnet: torchvision.models.ResNet, images: Tensor
) -> None:
    batch = run(resnet, images, classes=[4, 1])
    assert batch.targets.tolist() == [[4, 1]] * 3
    alone = run(resnet, images[2:], classes=[1])
    torch.testing.assert_close(alone.maps[0, 0], batch.maps[2, 1], rtol=1e-4, atol=1e-5)


def test_resolve_classes() -> None:
    names = ["airplane", "beach", "harbor"]
    assert resolve_classes(["harbor", "airplane"], names) == [2, 0]
    with pytest.raises(UnknownClassError, match="forest") as info:
        resolve_classes(["beach", "forest"], names)
    assert info.value.field == "classes"
    assert isinstance(info.value, KeyError)


def test_select_targets_validates_its_arguments() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5]])
    assert select_targets(logits, classes=None, top_k=2).tolist() == [[1, 2]]
    with pytest.raises(UnknownClassError) as info:
        select_targets(logits, classes=[3], top_k=1)
    assert info.value.field == "classes"
    with pytest.raises(InputError) as info2:
        select_targets(logits, classes=None, top_k=0)
    assert info2.value.field == "top_k"
    with pytest.raises(InputError):
        select_targets(logits, classes=[], top_k=1)


def test_gradcam_equals_relu_cam_over_area_for_a_gap_fc_head(
    resnet: torchvision.models.ResNet, images: Tensor
) -> None:
    cam = run(resnet, images, top_k=3)
    grad = run(resnet, images, method="gradcam", top_k=3)
    assert torch.equal(cam.targets, grad.targets)
    h, w = cam.maps.shape[-2:]
    torch.testing.assert_close(grad.maps, cam.maps.relu() / (h * w), rtol=1e-4, atol=1e-6)
    assert grad.maps.abs().sum() > 0


def test_gradcam_matches_a_manual_gradient_on_a_non_gap_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
        nn.Tanh(),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(UnsupportedModelError) as info:
        compute_cams(model, x, feature_layer="1", fc_layer=None, method="cam")
    assert info.value.field == "method"
    batch = compute_cams(model, x, feature_layer="1", fc_layer=None, method="gradcam", top_k=2)
    features = model[1](model[0](x)).detach().requires_grad_(True)
    scores = model[5](model[4](model[3](model[2](features))))
    for n in range(2):
        for t in range(2):
            (g,) = torch.autograd.grad(scores[n, batch.targets[n, t]], features, retain_graph=True)
            alpha = g[n].mean(dim=(1, 2))
            expected = torch.einsum("k,khw->hw", alpha, features[n].detach()).relu()
            torch.testing.assert_close(batch.maps[n, t], expected)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_no_graph_no_grads_and_flags_restored(
    resnet: torchvision.models.ResNet, images: Tensor, method: str
) -> None:
    resnet.train()
    resnet.layer2[0].bn1.eval()
    before = [m.training for m in resnet.modules()]
    try:
        batch = run(resnet, images, method=method, top_k=2)
        after = [m.training for m in resnet.modules()]
    finally:
        resnet.eval()
    assert after == before
    for tensor in (batch.logits, batch.probabilities, batch.maps):
        assert not tensor.requires_grad
        assert tensor.grad_fn is None
        assert not tensor.is_inference()
    assert all(p.grad is None for p in resnet.parameters())
    assert_no_hooks(resnet)
    # Eval mode was used: the result equals that of a model already in eval mode.
    torch.testing.assert_close(batch.maps, run(resnet, images, method=method, top_k=2).maps)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_hooks_and_flags_are_cleaned_up_when_the_forward_raises(method: str) -> None:
    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    model = torchvision.models.resnet18(num_classes=3).train()
    model.avgpool = Boom()
    model.layer1.eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        run(model, torch.randn(1, 3, 64, 64), method=method)
    assert [m.training for m in model.modules()] == before
    assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_accepts_inference_tensors_and_frozen_models(
    resnet: torchvision.models.ResNet, images: Tensor
) -> None:
    expected = run(resnet, images, method="gradcam").maps
    resnet.requires_grad_(False)
    try:
        with torch.inference_mode():
            inside = run(resnet, images.clone(), method="gradcam").maps
            cam_inside = run(resnet, images, method="cam").maps
    finally:
        resnet.requires_grad_(True)
    torch.testing.assert_close(inside, expected)
    assert cam_inside.shape == expected.shape


def test_bad_model_or_layers_are_unsupported(
    resnet: torchvision.models.ResNet, images: Tensor
) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        compute_cams(resnet, images, feature_layer="layer9", fc_layer="fc")
    assert info.value.field == "feature_layer"
    with pytest.raises(UnsupportedModelError) as info:
        compute_cams(resnet, images, feature_layer="layer4", fc_layer="avgpool")
    assert info.value.field == "fc_layer"
    with pytest.raises(UnsupportedModelError) as info:  # 256 channels vs a 512-input fc
        compute_cams(resnet, images, feature_layer="layer3", fc_layer="fc")
    assert info.value.field == "fc_layer"
    with pytest.raises(UnknownCamMethodError):
        compute_cams(resnet, images, feature_layer="layer4", fc_layer="fc", method="nope")
    with pytest.raises(InputError) as info2:
        compute_cams(resnet, images[0], feature_layer="layer4", fc_layer="fc")
    assert info2.value.field == "images"


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of maps (..., h, w) with maps of the same shape, per map."""
    a, b = a.flatten(-2).double(), b.flatten(-2).double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_bf16_maps_correlate_with_fp32(
    resnet: torchvision.models.ResNet, images: Tensor, method: str
) -> None:
    full = run(resnet, images, method, classes=[0, 1])
    low = run(resnet, images, method, classes=[0, 1], precision="bf16")
    assert low.maps.dtype == low.logits.dtype == torch.float32
    assert pearson(low.maps, full.maps).min() > 0.99
    span = full.maps.amax() - full.maps.amin()
    assert (low.maps - full.maps).abs().max() < 0.1 * span
    # Autocast really ran: bf16 rounding leaves a trace in the maps.
    assert not torch.equal(low.maps, full.maps)


def test_precision_is_validated(resnet: torchvision.models.ResNet, images: Tensor) -> None:
    for precision, needle in (("fp16", "CUDA"), ("int8", "fp32, bf16, fp16")):
        with pytest.raises(InputError, match=needle) as info:
            run(resnet, images, precision=precision)
        assert info.value.field == "precision"
    assert typing.get_args(CamPrecisionName) == PRECISIONS == ("fp32", "bf16", "fp16")
    assert CamOptions().precision == "fp32"
    with pytest.raises(ValidationError) as error:
        CamOptions(precision="fp8")  # type: ignore[arg-type]
    assert [e["loc"] for e in error.value.errors()] == [("precision",)]


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_channels_last_gives_the_same_maps(
    resnet: torchvision.models.ResNet, images: Tensor, method: str
) -> None:
    reference = run(resnet, images, method, top_k=2)
    nhwc = prepare_for_inference(copy.deepcopy(resnet))
    assert is_channels_last(nhwc)
    assert not is_channels_last(resnet)
    for x in (images, images.contiguous(memory_format=torch.channels_last)):
        got = run(nhwc, x, method, top_k=2)
        assert torch.equal(got.targets, reference.targets)
        # Other kernels (oneDNN's NHWC convolutions) sum in another order: fp32 rounding only.
        torch.testing.assert_close(got.maps, reference.maps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_upsample_is_bilinear_without_corner_alignment() -> None:
    maps = torch.arange(8.0).reshape(2, 2, 2)
    up = upsample(maps, (4, 6))
    assert up.shape == (2, 4, 6)
    # align_corners=False: pixel centers map to (x + 0.5)·(2/6) − 0.5, clamped at the borders.
    torch.testing.assert_close(up[0, 0], torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))
    torch.testing.assert_close(up[1, :, 0], torch.tensor([4.0, 4.5, 5.5, 6.0]))
    flat = upsample(torch.full((1, 1, 3, 3), 2.5), (5, 7))
    torch.testing.assert_close(flat, torch.full((1, 1, 5, 7), 2.5))
    # Rounding noise of an upsampled constant map is not stretched into a pattern.
    assert normalize(flat).eq(0).all()


def test_normalize_per_map_with_and_without_relu() -> None:
    maps = torch.stack(
        [
            torch.tensor([[-2.0, 0.0], [1.0, 3.0]]),
            torch.full((2, 2), 4.0),
            torch.tensor([[-3.0, -1.0], [-2.0, -1.0]]),
        ]
    )
    out = normalize(maps, relu=True)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0], [1 / 3, 1.0]]))
    assert out[1].eq(0).all()  # constant → zeros
    assert out[2].eq(0).all()  # all negative → constant 0 after ReLU
    assert not out.isnan().any()
    raw = normalize(maps, relu=False)
    torch.testing.assert_close(raw[0], torch.tensor([[0.0, 0.4], [0.6, 1.0]]))
    torch.testing.assert_close(raw[2], torch.tensor([[0.0, 1.0], [0.5, 1.0]]))
