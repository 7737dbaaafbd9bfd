"""Classifier architectures by name, with the two layers CAM needs.

Eq. 1 of the paper (Zhou et al.'s CAM) reads ``F_c(x, y) = Σ_k w_k^c f^k(x, y)``: ``f^k`` is
the output of the last convolutional stage and ``w^c`` the row of the linear layer applied right
after global average pooling (GAP). It is *exact* — the logit of class ``c`` equals the spatial
mean of ``F_c`` plus the bias — only when nothing but GAP (and Dropout, the identity at
inference) sits between those two layers. :class:`ArchSpec` names both layers, and only networks
for which that holds get an ``fc_layer``; networks whose classifier is an MLP (VGG, MobileNetV3)
are registered with ``fc_layer=None`` so that only Grad-CAM applies to them.

The registry follows torchvision's ``torchvision/models/_api.py``; ImageNet weights come through
torchvision's weights API, so the usual hub cache (``torch.hub.get_dir()``) is used.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError

import torch
from torch import nn
from torchvision import models as tvm

from core.exceptions import (
    InputError,
    RegistryError,
    UnknownArchitectureError,
    WeightsUnavailableError,
)
from core.registry import Registry

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "build_model",
    "get_arch",
    "list_architectures",
]

#: Number of classes of the ImageNet heads shipped with torchvision's weights.
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and where CAM reads it.

    ``weights`` is a torchvision weights enum entry (``"ResNet50_Weights.IMAGENET1K_V2"``);
    ``feature_layer`` the module whose output is ``f^k`` of Eq. 1 (or Grad-CAM's target);
    ``fc_layer`` the Linear right after GAP, ``None`` when the network has no GAP→fc head;
    ``head_layer`` the Linear that produces the logits and is replaced for a new class list —
    it defaults to ``fc_layer`` and must be given when there is none.
    """

    name: str
    builder: Callable[..., nn.Module]
    weights: str | None
    feature_layer: str
    fc_layer: str | None
    head_layer: str | None = None

    def __post_init__(self) -> None:
        if self.head_layer is None and self.fc_layer is None:
            raise RegistryError(f"architecture {self.name!r} needs a head_layer or an fc_layer")
        if self.head_layer is not None and self.fc_layer not in (None, self.head_layer):
            raise RegistryError(
                f"architecture {self.name!r}: with a GAP→fc head, head_layer must be fc_layer"
            )

    @property
    def logits_layer(self) -> str:
        """Name of the Linear that outputs the class scores."""
        return self.head_layer or self.fc_layer  # type: ignore[return-value]  # __post_init__

    @property
    def supports_cam(self) -> bool:
        """Whether exact CAM (Eq. 1) applies, i.e. the network has a GAP→fc head."""
        return self.fc_layer is not None


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", UnknownArchitectureError, field="arch")


def _register(spec: ArchSpec) -> None:
    ARCHITECTURES.add(spec.name, spec)


# ResNet family (the paper uses ResNet50): layer4 ends in the ReLU after the residual sum, then
# AdaptiveAvgPool2d(1) → flatten → fc. Exact CAM.
for _name, _builder, _weights in (
    ("resnet18", tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet34", tvm.resnet34, "ResNet34_Weights.IMAGENET1K_V1"),
    ("resnet50", tvm.resnet50, "ResNet50_Weights.IMAGENET1K_V2"),
    ("resnet101", tvm.resnet101, "ResNet101_Weights.IMAGENET1K_V2"),
    ("resnet152", tvm.resnet152, "ResNet152_Weights.IMAGENET1K_V2"),
    ("wide_resnet50_2", tvm.wide_resnet50_2, "Wide_ResNet50_2_Weights.IMAGENET1K_V2"),
    ("wide_resnet101_2", tvm.wide_resnet101_2, "Wide_ResNet101_2_Weights.IMAGENET1K_V2"),
    ("resnext50_32x4d", tvm.resnext50_32x4d, "ResNeXt50_32X4D_Weights.IMAGENET1K_V2"),
    ("resnext101_32x8d", tvm.resnext101_32x8d, "ResNeXt101_32X8D_Weights.IMAGENET1K_V2"),
    ("resnext101_64x4d", tvm.resnext101_64x4d, "ResNeXt101_64X4D_Weights.IMAGENET1K_V1"),
):
    _register(ArchSpec(_name, _builder, _weights, feature_layer="layer4", fc_layer="fc"))

# EfficientNet: features end in Conv-BN-SiLU, then GAP → Dropout → Linear; Dropout is the
# identity at inference, so Eq. 1 stays exact.
_register(
    ArchSpec(
        "efficientnet_b0",
        tvm.efficientnet_b0,
        "EfficientNet_B0_Weights.IMAGENET1K_V1",
        feature_layer="features",
        fc_layer="classifier.1",
    )
)

# No GAP→fc head: the classifier is an MLP (VGG also pools to 7×7, not 1×1), so a class score is
# not a linear function of the pooled features and only Grad-CAM applies. VGG's target is the
# ReLU of its last convolution (before the final max-pool), as in Selvaraju et al.
for _name, _builder, _weights, _feature in (
    ("vgg11", tvm.vgg11, "VGG11_Weights.IMAGENET1K_V1", "features.19"),
    ("vgg16", tvm.vgg16, "VGG16_Weights.IMAGENET1K_V1", "features.29"),
):
    _register(
        ArchSpec(
            _name,
            _builder,
            _weights,
            feature_layer=_feature,
            fc_layer=None,
            head_layer="classifier.6",
        )
    )
_register(
    ArchSpec(
        "mobilenet_v3_small",
        tvm.mobilenet_v3_small,
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        feature_layer="features",
        fc_layer=None,
        head_layer="classifier.3",
    )
)


def get_arch(name: str) -> ArchSpec:
    """The registered :class:`ArchSpec` for ``name`` (:class:`UnknownArchitectureError`)."""
    return ARCHITECTURES.get(name)


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return ARCHITECTURES.names()


def build_model(arch: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    """Build ``arch`` with a ``num_classes``-way head, in training mode.

    With ``pretrained`` the ImageNet weights named by the spec are loaded through torchvision
    (the hub cache first, then a download); the head is then replaced by a freshly initialised
    Linear unless ``num_classes`` is ImageNet's 1000. Without network access and without a cached
    file this raises :class:`WeightsUnavailableError`.
    """
    spec = get_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(
            f"num_classes must be a positive integer, got {num_classes!r}", field="num_classes"
        )
    if not pretrained:
        return spec.builder(weights=None, num_classes=num_classes)
    model = _build_pretrained(spec)
    if num_classes != IMAGENET_CLASSES:
        replace_head(model, spec, num_classes)
    return model


def replace_head(model: nn.Module, spec: ArchSpec, num_classes: int) -> nn.Linear:
    """Swap the logits Linear of ``model`` for a new, randomly initialised ``num_classes``-way
    one (transfer learning keeps the backbone, not the ImageNet classes)."""
    old = model.get_submodule(spec.logits_layer)
    if not isinstance(old, nn.Linear):
        raise RegistryError(f"{spec.name}: {spec.logits_layer!r} is not a Linear layer")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = spec.logits_layer.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return new


def _build_pretrained(spec: ArchSpec) -> nn.Module:
    if spec.weights is None:
        raise WeightsUnavailableError(
            f"architecture {spec.name!r} has no pretrained weights", field="pretrained"
        )
    weights = tvm.get_weight(spec.weights)
    try:
        # torchvision's own path (hub cache, else download with hash check), but through torch's
        # restricted unpickler: a tampered cache file cannot run code.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        model = spec.builder(weights=None, num_classes=len(weights.meta["categories"]))
        model.load_state_dict(state)
    # urllib/socket failures are OSErrors; a cut connection can surface as an HTTPException; a
    # corrupt or foreign cached file fails the hash check, unpickling or the strict load.
    except (OSError, http.client.HTTPException, RuntimeError, EOFError, UnpicklingError) as exc:
        raise WeightsUnavailableError(_weights_message(spec.weights, weights.url, exc)) from exc
    return model


def _weights_message(name: str, url: str, exc: BaseException) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"cannot load the pretrained weights {name} ({url}): {exc}. "
        f"Either allow network access, or place the file in the torch hub cache {cache} "
        "(set TORCH_HOME to use another cache), or train without pretrained weights."
    )
