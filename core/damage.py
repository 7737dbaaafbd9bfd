"""Permanent weight damage and exact masked retraining (Vasu & Savakis §3.2, §4.2).

The paper drops ``D%`` of the ``N`` weights of the first convolution of every block at locations
D1–D4 (``layer1``…``layer4`` of a ResNet), forcing them to zero ("stuck at zero"); skip
connections are never altered. Damage is *permanent*: damaged weights keep their fault value in
the test and retrain phases, and retraining updates only the undamaged weights, with no gradient
flowing to the damaged ones.

* **Count.** Each targeted layer loses exactly ``k = round(D · N)`` weights of its ``weight``
  parameter (never its bias), with Python's ``round`` — round half to even, computed in float64 —
  so ``k`` is unbiased across layers and non-decreasing in ``D``. A layer with ``D · N < 0.5``
  loses no weight.
* **Choice.** Each layer draws one uniform random permutation of its ``N`` entries and damages
  the first ``k``. The generator is a CPU :class:`torch.Generator` seeded from the spec's seed
  and the layer's *name* (SHA-256, not Python's salted ``hash``), so masks are the same on every
  device and process, independent of the other targets, and *nested*: for one seed the weights
  damaged at a smaller ``D`` are a subset of those damaged at a larger one. (Reproducible for a
  given torch version, whose ``randperm`` defines the shuffle; damaged checkpoints store their
  masks, so they do not depend on it.)
* **Permanence.** :func:`hold_damage` keeps damaged weights bit-exactly at their fault values
  through any number of optimizer steps (see its docstring for why masking gradients alone is
  not enough).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.checkpoint import load_model, save_checkpoint
from core.checkpoint_meta import LineageStep
from core.damage_spec import PRESETS, DamageSpec
from core.exceptions import DamageSpecError
from core.faults import fault_model
from core.masks import damaged_count, layer_masks, seeded_generator
from core.progress import ProgressCallback, ShouldStop
from core.train_spec import TrainConfig, TrainResult
from core.training import StepGuard, fit
from core.training_data import LabelledDataset

__all__ = [
    "Damage",
    "DamageCheck",
    "Masks",
    "StepGuard",
    "Values",
    "apply_damage",
    "damage_checkpoint",
    "damage_guard",
    "damage_masks",
    "damaged",
    "damaged_count",
    "fault_values",
    "hold_damage",
    "resolve_targets",
    "retrain",
    "verify_damage",
]

#: Parameter name → bool tensor shaped like the parameter, ``True`` = damaged.
Masks = Mapping[str, Tensor]
#: Parameter name → tensor shaped like the parameter whose entries under the mask are the values
#: to hold there (a snapshot of the damaged parameter; other entries are ignored). Full-shape
#: rather than ``param[mask]``: a copy costs ~0.1 ms per million weights, a boolean gather ~10.
Values = Mapping[str, Tensor]

_SAME_SIZE_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


# --------------------------------------------------------------------------- targets and masks


def resolve_targets(model: nn.Module, spec: DamageSpec) -> list[str]:
    """Names of the modules ``spec.targets`` selects, in the model's module order.

    A target is a preset (``D1``–``D4``), a module name, or an :func:`fnmatch.fnmatchcase` glob
    over ``model.named_modules()`` names (``*`` also crosses dots). Every target must match at
    least one module and every matched module must own a ``weight`` parameter; otherwise a
    :class:`DamageSpecError` with ``field="targets"`` names the target and lists valid names.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    selected: set[str] = set()
    for target, pattern in zip(spec.targets, spec.patterns(), strict=True):
        matched = [name for name in modules if fnmatchcase(name, pattern)]
        if not matched:
            shown = target if pattern == target else f"{target} ({pattern})"
            raise DamageSpecError(
                f"damage target {shown!r} matches no module of the model; "
                f"weighted modules include {_examples(modules)}",
                field="targets",
            )
        for name in matched:
            if not isinstance(getattr(modules[name], "weight", None), nn.Parameter):
                raise DamageSpecError(
                    f"damage target {target!r} matches module {name!r}, which has no weight "
                    f"parameter; narrow the pattern (weighted modules include "
                    f"{_examples(modules)})",
                    field="targets",
                )
        selected.update(matched)
    return [name for name in modules if name in selected]


def _examples(modules: Mapping[str, nn.Module], limit: int = 8) -> str:
    weighted = [
        n for n, m in modules.items() if isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    more = ", …" if len(weighted) > limit else ""
    return ", ".join(weighted[:limit]) + more + f" (presets: {', '.join(PRESETS)})"


def damage_masks(model: nn.Module, spec: DamageSpec) -> dict[str, Tensor]:
    """The damage masks of ``spec`` on ``model``, without touching its weights.

    Keys are parameter names (``"layer4.0.conv1.weight"``); each mask is a bool tensor shaped
    like the parameter, on its device, with exactly ``round(spec.fraction · N)`` entries set.
    """
    return layer_masks(model, resolve_targets(model, spec), spec.fraction, spec.seed)


# --------------------------------------------------------------------------- injection


@dataclass(frozen=True)
class DamageCheck:
    """Whether every damaged weight still holds its fault value, per parameter."""

    damaged: dict[str, int]
    mismatched: dict[str, int]

    @property
    def ok(self) -> bool:
        return not any(self.mismatched.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for job results and benchmark reports)."""
        return {
            "ok": self.ok,
            "damaged": sum(self.damaged.values()),
            "mismatched": sum(self.mismatched.values()),
            "layers": {
                n: {"damaged": c, "mismatched": self.mismatched[n]} for n, c in self.damaged.items()
            },
        }


@dataclass(eq=False)
class Damage:
    """Damage applied in place to ``model``: its ``spec``, its ``masks``, and copies of each
    damaged parameter after (``faults``) and before (``intact``) the damage, so that
    :meth:`restore` undoes it exactly (a weight's fault value is ``faults[name][mask]``)."""

    model: nn.Module
    spec: DamageSpec
    masks: dict[str, Tensor]
    faults: dict[str, Tensor] = field(repr=False)
    intact: dict[str, Tensor] = field(repr=False)

    def restore(self) -> None:
        """Write the intact values back at the damaged positions (other weights are kept, so
        restoring after retraining keeps what retraining learnt elsewhere)."""
        _impose(_parameters(self.model, self.masks), self.masks, self.intact)

    def verify(self) -> DamageCheck:
        """:func:`verify_damage` against the fault values this damage wrote."""
        return verify_damage(self.model, self.masks, self.faults)

    def hold(self, optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
        """:func:`hold_damage` with this damage's fault values."""
        return hold_damage(self.model, self.masks, optimizer, self.faults)


def apply_damage(model: nn.Module, spec: DamageSpec) -> Damage:
    """Damage ``model`` in place as ``spec`` says and return what is needed to undo it.

    Vectorized per layer: one mask, one corrupted copy of the layer from the fault model, one
    ``torch.where``. Faults are drawn for every position from their own seeded CPU stream, so a
    weight's fault value does not depend on the fraction either. Keeps two copies of each
    damaged layer (``Damage.faults``, ``Damage.intact``).
    """
    fault = fault_model(spec.fault)
    names = resolve_targets(model, spec)
    masks = layer_masks(model, names, spec.fraction, spec.seed)
    faults: dict[str, Tensor] = {}
    intact: dict[str, Tensor] = {}
    with torch.no_grad():
        for name in names:
            key = f"{name}.weight"
            weight = model.get_parameter(key)
            corrupted = fault.corrupt(weight.detach(), seeded_generator(spec.seed, "fault", name))
            intact[key] = weight.detach().clone()
            faults[key] = torch.where(masks[key], corrupted, weight.detach())
            weight.copy_(faults[key])
    return Damage(model, spec, masks, faults, intact)


@contextmanager
def damaged(model: nn.Module, spec: DamageSpec) -> Iterator[Damage]:
    """Apply ``spec`` to ``model`` for the duration of the block, then restore the intact
    weights, also when the block raises."""
    damage = apply_damage(model, spec)
    try:
        yield damage
    finally:
        damage.restore()


# --------------------------------------------------------------------------- permanence


def _parameters(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise DamageSpecError(f"damage mask for unknown parameter {name!r}", field="masks")
        if mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise DamageSpecError(
                f"damage mask for {name!r} must be a bool tensor of shape "
                f"{tuple(params[name].shape)}, got {mask.dtype} {tuple(mask.shape)}",
                field="masks",
            )
    return {name: params[name] for name in masks}


def _impose(params: Mapping[str, nn.Parameter], masks: Masks, values: Values) -> None:
    with torch.no_grad():
        for name, param in params.items():
            mask = masks[name].to(param.device)
            param.copy_(torch.where(mask, values[name].to(param.device, param.dtype), param))


def fault_values(model: nn.Module, masks: Masks) -> dict[str, Tensor]:
    """Copies of the damaged parameters as they are now (see :data:`Values`): the fault values
    to hold for a model loaded from a damaged checkpoint."""
    return {name: p.detach().clone() for name, p in _parameters(model, masks).items()}


def _checked_values(params: Mapping[str, nn.Parameter], values: Values) -> None:
    for name, param in params.items():
        got = values.get(name)
        if got is None or got.shape != param.shape:
            shape = "none" if got is None else tuple(got.shape)
            raise DamageSpecError(
                f"fault values for {name!r} must be shaped like the parameter "
                f"{tuple(param.shape)}, got {shape}",
                field="values",
            )


@contextmanager
def hold_damage(
    model: nn.Module,
    masks: Masks,
    optimizer: torch.optim.Optimizer,
    values: Values | None = None,
) -> Iterator[None]:
    """Keep the damaged weights of ``model`` exactly at their fault values while ``optimizer``
    steps inside the block (the paper's permanent damage during retraining).

    Masking gradients alone is not exact: SGD weight decay adds ``λ·w`` to the update of a
    damaged weight (non-zero unless the fault value is 0), momentum and Adam moments carry such
    terms over steps, AdamW decays weights directly, and ``torch.nn.utils.prune`` masks are lost
    by ``prune.remove`` (and pruned models cannot be deep-copied, pytorch/pytorch#37322).
    So three mechanisms work together:

    1. on entry, the fault values are written at the damaged positions (``values``; by default
       the values they hold now);
    2. a tensor hook on each damaged parameter zeroes its gradient at the damaged positions, so
       no gradient reaches them and the optimizer statistics of a stuck-at-zero weight stay 0;
    3. an optimizer step post-hook (torch ≥ 2.0) writes the fault values back after every step,
       which makes the invariant exact whatever the optimizer does (weight decay, momentum,
       Nesterov, Adam(W), fused or foreach kernels). A step skipped by ``GradScaler`` changes
       nothing and needs no repair.

    Every hook is removed on exit, also when the block raises.
    """
    params = _parameters(model, masks)
    if values is not None:
        _checked_values(params, values)
    # Moved to the parameters' device once, not at every step.
    held_masks = {n: masks[n].to(p.device) for n, p in params.items()}
    held = {
        n: (values[n] if values is not None else p.detach()).to(p.device, p.dtype, copy=True)
        for n, p in params.items()
    }
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        _impose(params, held_masks, held)
        for name, param in params.items():
            if param.requires_grad:  # a frozen parameter gets no gradient, and takes no hook
                handles.append(param.register_hook(_gradient_mask(held_masks[name])))
        handles.append(
            optimizer.register_step_post_hook(lambda *_: _impose(params, held_masks, held))
        )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gradient_mask(mask: Tensor) -> Callable[[Tensor], Tensor]:
    def zero_damaged(grad: Tensor) -> Tensor:
        return grad.masked_fill(mask, 0)

    return zero_damaged


def _bits(values: Tensor) -> Tensor:
    # Bitwise comparison: exact, and NaN/inf fault values (bit flips) compare equal to themselves.
    as_int = _SAME_SIZE_INT.get(values.dtype)
    return values.view(as_int) if as_int is not None else values


def verify_damage(model: nn.Module, masks: Masks, values: Values) -> DamageCheck:
    """Count, per parameter, the damaged weights whose bits differ from their fault values."""
    params = _parameters(model, masks)
    _checked_values(params, values)
    damaged: dict[str, int] = {}
    mismatched: dict[str, int] = {}
    for name, param in params.items():
        mask = masks[name].to(param.device)
        expected = values[name].to(param.device, param.dtype)
        damaged[name] = int(mask.sum())
        mismatched[name] = int(((_bits(param.detach()) != _bits(expected)) & mask).sum())
    return DamageCheck(damaged, mismatched)


# --------------------------------------------------------------------------- retraining


def retrain(
    model: nn.Module,
    masks: Masks,
    train_ds: LabelledDataset,
    val_ds: LabelledDataset | None,
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> TrainResult:
    """Masked retraining (paper §3.2, §4.2): :func:`core.training.fit` on a damaged ``model``
    with every damaged weight held at the value it has now (its fault value) by
    :func:`hold_damage`, so only the undamaged weights learn.

    ``masks`` are the damage masks, e.g. ``Damage.masks`` or ``Checkpoint.damage_masks``. The
    invariant is checked again afterwards; a breach is a bug, raised as ``RuntimeError``.
    """
    values = fault_values(model, masks)
    result = fit(
        model,
        train_ds,
        val_ds,
        config,
        progress=progress,
        should_stop=should_stop,
        step_guard=damage_guard(model, masks, values),
    )
    check = verify_damage(model, masks, values)
    if not check.ok:
        raise RuntimeError(f"masked retraining moved damaged weights: {check.as_dict()}")
    return result


def damage_guard(model: nn.Module, masks: Masks, values: Values | None = None) -> StepGuard:
    """The ``step_guard`` of :func:`core.training.fit` that holds ``model``'s damage."""

    def guard(optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
        return hold_damage(model, masks, optimizer, values)

    return guard


def damage_checkpoint(src_path: str | Path, spec: DamageSpec, dst_path: str | Path) -> str:
    """Damage the model of checkpoint ``src_path`` as ``spec`` says and save it to ``dst_path``
    with its damage masks; returns the new file's digest.

    The metadata gains a ``damage`` lineage step (parent digest, the spec as JSON) and
    ``damage = spec``. Damaging an already damaged checkpoint composes: the masks are united and
    a weight hit again takes the new fault of its current value.
    """
    model, parent = load_model(src_path)
    damage = apply_damage(model, spec)
    masks = dict(parent.damage_masks)
    for name, mask in damage.masks.items():
        masks[name] = masks[name] | mask if name in masks else mask
    step = LineageStep(
        op="damage", parent_digest=parent.digest, params=spec.model_dump(mode="json")
    )
    meta = parent.meta.model_copy(update={"lineage": [*parent.meta.lineage, step], "damage": spec})
    return save_checkpoint(dst_path, model, meta, damage_masks=masks)
