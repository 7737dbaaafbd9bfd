"""Architecture registry, model building, Eq. 1 exactness of the registered CAM layers, and the
pretrained-weights path (through an empty or prepared hub cache; never the network)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub
from torch import fx, nn

from core.exceptions import (
    InputError,
    RegistryError,
    UnknownArchitectureError,
    WeightsUnavailableError,
)
from core.models import ARCHITECTURES, ArchSpec, build_model, get_arch, list_architectures

REQUIRED = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
]
CAM_ARCHS = [name for name in list_architectures() if get_arch(name).fc_layer is not None]
GRADCAM_ONLY = [name for name in list_architectures() if get_arch(name).fc_layer is None]


def test_required_architectures_are_registered() -> None:
    assert set(REQUIRED) <= set(list_architectures())
    assert list_architectures() == sorted(list_architectures())
    assert GRADCAM_ONLY, "at least one network without a GAP→fc head, for Grad-CAM"


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        get_arch("resnet5000")
    assert info.value.field == "arch"
    assert "resnet5000" in str(info.value)
    assert "resnet50" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownArchitectureError):
        build_model("alexnet", 3)


def test_duplicate_and_headless_registrations_are_refused() -> None:
    spec = get_arch("resnet18")
    with pytest.raises(RegistryError, match="already registered"):
        ARCHITECTURES.add("resnet18", spec)
    with pytest.raises(RegistryError, match="head_layer"):
        ArchSpec("x", spec.builder, None, feature_layer="layer4", fc_layer=None)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_num_classes_is_validated(num_classes: object) -> None:
    with pytest.raises(InputError) as info:
        build_model("resnet18", num_classes)  # type: ignore[arg-type]
    assert info.value.field == "num_classes"


@pytest.mark.parametrize("name", list_architectures())
def test_every_architecture_has_its_layers_and_a_new_head(name: str) -> None:
    spec = get_arch(name)
    with torch.device("meta"):  # structure only: no memory, no initialisation
        model = build_model(name, 7)
    model.get_submodule(spec.feature_layer)
    head = model.get_submodule(spec.logits_layer)
    assert isinstance(head, nn.Linear)
    assert head.out_features == 7
    if spec.fc_layer is not None:
        assert spec.logits_layer == spec.fc_layer
        assert spec.supports_cam
    else:
        assert not spec.supports_cam
    # The weights enum entry must exist in this torchvision (resolving it downloads nothing).
    from torchvision.models import get_weight

    assert spec.weights is not None
    assert len(get_weight(spec.weights).meta["categories"]) == 1000


class _Tracer(fx.Tracer):
    """Keeps the named modules opaque so the graph shows what happens between them."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(module, qualname)


def _ops_between_features_and_head(name: str) -> list[object]:
    """The modules/functions on the data path from ``feature_layer`` to the logits Linear."""
    spec = get_arch(name)
    with torch.device("meta"):
        model = build_model(name, 5)
    graph = _Tracer({spec.feature_layer, spec.logits_layer}).trace(model)
    calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
    node = calls[spec.logits_layer].args[0]
    path: list[object] = []
    while node is not calls[spec.feature_layer]:
        assert isinstance(node, fx.Node)
        assert node.op != "placeholder", "feature_layer is not on the path to the head"
        path.append(
            model.get_submodule(str(node.target)) if node.op == "call_module" else node.target
        )
        node = node.args[0]
    return path


def _is_gap_or_identity(op: object) -> bool:
    if isinstance(op, nn.AdaptiveAvgPool2d):
        return op.output_size in (1, (1, 1))
    return isinstance(op, nn.Dropout) or op in (torch.flatten, "flatten")


@pytest.mark.parametrize("name", CAM_ARCHS)
def test_only_gap_and_dropout_sit_between_features_and_fc(name: str) -> None:
    """What makes Eq. 1 exact: logits = fc(GAP(f)) with nothing else in between."""
    path = _ops_between_features_and_head(name)
    assert any(isinstance(op, nn.AdaptiveAvgPool2d) for op in path)
    assert all(_is_gap_or_identity(op) for op in path), path


@pytest.mark.parametrize("name", GRADCAM_ONLY)
def test_gradcam_only_architectures_have_an_mlp_head(name: str) -> None:
    path = _ops_between_features_and_head(name)
    assert any(isinstance(op, nn.Linear) for op in path)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "efficientnet_b0"])
def test_eq1_reproduces_the_logits(name: str) -> None:
    """Eq. 1 numerically: the logit of class c is the spatial mean of F_c = Σ_k w_k^c f^k plus
    the bias, with f^k the output of ``feature_layer`` (one representative per family)."""
    spec = get_arch(name)
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(spec.feature_layer).register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    try:
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 64, 64))
    finally:
        handle.remove()
    fc = model.get_submodule(spec.fc_layer)  # type: ignore[arg-type]
    assert isinstance(fc, nn.Linear)
    cams = torch.einsum("ck,nkhw->nchw", fc.weight, captured[0])
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + fc.bias, logits, rtol=1e-4, atol=1e-4)


def test_build_model_is_in_training_mode_without_pretrained() -> None:
    model = build_model("resnet18", 3)
    assert model.training
    assert model.fc.out_features == 3  # type: ignore[union-attr]


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and a network that is down: any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    return Path(torch.hub.get_dir())


def test_pretrained_without_network_or_cache_is_a_clear_error(empty_hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", 3, pretrained=True)
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert str(empty_hub / "checkpoints") in message
    assert "network disabled" in message
    assert not list((empty_hub / "checkpoints").glob("*.pth"))


def test_pretrained_weights_come_from_the_hub_cache(empty_hub: Path) -> None:
    """With the file in torchvision's cache no download is tried; the head is then replaced."""
    torch.manual_seed(1)
    imagenet = build_model("resnet18", 1000)
    cache = empty_hub / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / "resnet18-f37072fd.pth")

    model = build_model("resnet18", 4, pretrained=True)
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight, rtol=0, atol=0)  # type: ignore[union-attr]
    assert model.fc.out_features == 4  # type: ignore[union-attr]
    same = build_model("resnet18", 1000, pretrained=True)
    torch.testing.assert_close(same.fc.weight, imagenet.fc.weight, rtol=0, atol=0)  # type: ignore[union-attr]


def test_a_corrupt_cache_file_is_reported_not_unpickled(empty_hub: Path) -> None:
    cache = empty_hub / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(WeightsUnavailableError, match="ResNet18_Weights"):
        build_model("resnet18", 3, pretrained=True)
