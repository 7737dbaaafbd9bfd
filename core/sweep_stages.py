"""A network run as a chain of steps, so a sweep can cut it where damage begins.

Damage at one location cannot change the activations computed *before* its first damaged layer,
so a sweep computes those once per image (the *prefix*) and reruns only the rest (the *suffix*)
for every damaged copy. That needs the network's forward pass written as a chain of steps whose
composition is exactly ``model(x)``: the same modules, called in the same order on the same
tensors, so the suffix gives bit-identical results.

Known plans follow torchvision's ``forward``/``_forward_impl`` (checked not to be overridden by a
subclass). Within a plan, every ``nn.Sequential`` step (whose forward only chains its children)
is split into its children unless it is hooked or is a layer that must stay whole (the CAM
feature layer, whose output is captured by a forward hook), so the cut can fall at a block
boundary. For a ResNet damaged at D2 the prefix is stem + ``layer1`` and the suffix
``layer2`` … ``fc``. A network without a known plan runs as a single step: no prefix, same
results.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torchvision import models as tvm

__all__ = ["NET", "Resumed", "Stages"]

#: Name of the wrapped network inside :class:`Resumed` (its module names gain ``"net."``).
NET = "net"

_FLATTEN = "<flatten>"
Step = tuple[str, Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class _Plan:
    """A torchvision class whose ``methods`` run ``steps`` in order (``_FLATTEN`` is
    ``torch.flatten(x, 1)``)."""

    owner: type[nn.Module]
    methods: tuple[str, ...]
    steps: tuple[str, ...]


_HEAD = ("avgpool", _FLATTEN, "classifier")
_RESNET_HEAD = ("avgpool", _FLATTEN, "fc")
_PLANS = (
    _Plan(
        tvm.ResNet,
        ("forward", "_forward_impl"),
        ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", *_RESNET_HEAD),
    ),
    _Plan(tvm.EfficientNet, ("forward", "_forward_impl"), ("features", *_HEAD)),
    _Plan(tvm.MobileNetV3, ("forward", "_forward_impl"), ("features", *_HEAD)),
    _Plan(tvm.VGG, ("forward",), ("features", *_HEAD)),
)


def _plan_of(model: nn.Module) -> _Plan | None:
    """The plan of ``model``'s class, unless a subclass or the instance replaced its forward."""
    for plan in _PLANS:
        if (
            isinstance(model, plan.owner)
            and all(getattr(type(model), m) is getattr(plan.owner, m) for m in plan.methods)
            and not any(m in vars(model) for m in plan.methods)
        ):
            return plan
    return None


def _splittable(module: nn.Module) -> bool:
    hooked = module._forward_hooks or module._forward_pre_hooks
    return type(module).forward is nn.Sequential.forward and not hooked


class Stages:
    """``model``'s forward pass as a list of named steps; ``whole`` names modules that must be
    called as one (hooked layers)."""

    def __init__(self, model: nn.Module, *, whole: Collection[str] = ()) -> None:
        self.model = model
        plan = _plan_of(model)
        if plan is None or model._forward_hooks or model._forward_pre_hooks:
            self.steps: list[Step] = [("", model)]
            return
        steps: list[Step] = []
        for name in plan.steps:
            if name == _FLATTEN:
                steps.append((name, partial(torch.flatten, start_dim=1)))
            else:
                steps.extend(_split(name, model.get_submodule(name), set(whole)))
        self.steps = steps

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.steps]

    def boundary(self, modules: Iterable[str]) -> int:
        """Index of the first step that is or contains one of ``modules`` (names as in
        ``named_modules``): everything before it cannot see a change to them."""
        wanted = list(modules)
        for index, (name, _) in enumerate(self.steps):
            if not name or any(m == name or m.startswith(name + ".") for m in wanted):
                return index
        return len(self.steps)

    def prefix(self, x: Tensor, end: int) -> Tensor:
        """The activations entering step ``end`` (``x`` itself for ``end = 0``)."""
        for _, step in self.steps[:end]:
            x = step(x)
        return x

    def resumed(self, start: int) -> Resumed:
        """The network from step ``start`` on, as a module (see :class:`Resumed`)."""
        return Resumed(self.model, self.steps[start:])


def _split(name: str, module: nn.Module, whole: set[str]) -> list[Step]:
    if name in whole or not _splittable(module):
        return [(name, module)]
    steps: list[Step] = []
    for child_name, child in module.named_children():
        steps.extend(_split(f"{name}.{child_name}", child, whole))
    return steps


class Resumed(nn.Module):
    """A network resumed at a step: ``Resumed(model, steps)(prefix_output)`` equals
    ``model(images)``. The network is registered as the child :data:`NET`, so its layers keep
    their names under ``"net."`` and a CAM extractor can hook them (``"net.layer4"``)."""

    def __init__(self, model: nn.Module, steps: list[Step]) -> None:
        super().__init__()
        self.net = model
        self._steps = list(steps)  # a plain list: the modules are already registered in net

    def forward(self, x: Tensor) -> Tensor:
        for _, step in self._steps:
            x = step(x)
        return x
