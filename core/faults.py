"""Fault models: the value a weight takes once it is damaged.

The paper (Vasu & Savakis §3.2) uses *stuck-at-zero*: a damaged weight is forced to 0. Two more
hardware-style faults are offered for comparison: IEEE-754 float32 bit flips in the manner of
Ares (Reagen et al., DAC 2018, the paper's ref. [7]) and additive Gaussian noise scaled to the
layer's weight spread.

Each fault model is a subclass of :class:`_FaultModel` registered in :data:`FAULT_MODELS` under
its spec ``kind``. Its one method, :meth:`_FaultModel.corrupt`, maps a whole layer weight tensor
to the value *every* entry would take if it were damaged; :mod:`core.damage` then keeps that value
only where the damage mask is set. Drawing per position rather than per damaged entry makes a
weight's fault value independent of the damage fraction, so nested masks (5 % ⊂ 10 % ⊂ …) also
share their fault values.

Random draws come from a CPU :class:`torch.Generator` and are moved to the weight's device
afterwards, so a seed gives the same faults on every device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from core.damage_spec import BitFlip, FaultSpec, Gaussian, StuckAt
from core.exceptions import DamageSpecError, UnknownFaultModelError
from core.registry import Registry

__all__ = ["FAULT_MODELS", "fault_model"]

SpecT = TypeVar("SpecT", StuckAt, BitFlip, Gaussian)

#: float32 word with exactly bit ``b`` set, for b = 0…31 (bit 31, the sign, is INT32_MIN).
_BIT_MASKS = torch.tensor([1 << b for b in range(31)] + [-(1 << 31)], dtype=torch.int32)


class _FaultModel(ABC, Generic[SpecT]):
    """A fault, configured by its validated spec (one of :data:`core.damage_spec.FaultSpec`)."""

    def __init__(self, spec: SpecT) -> None:
        self.spec: SpecT = spec

    @abstractmethod
    def corrupt(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        """The damaged value of every entry of ``weight`` (same shape, dtype and device).

        ``weight`` is the intact layer weight and is not modified. ``generator`` is a seeded CPU
        generator private to this layer; a random fault draws one value per entry of ``weight``,
        in order, so that an entry's fault does not depend on which other entries are damaged.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


FAULT_MODELS: Registry[type[_FaultModel[Any]]] = Registry(
    "fault model", UnknownFaultModelError, field="fault.kind"
)


@FAULT_MODELS.register("stuck_at")
class StuckAtFault(_FaultModel[StuckAt]):
    """The weight reads a constant: ``spec.value`` (0 in the paper: stuck-at-zero)."""

    def corrupt(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        return torch.full_like(weight, self.spec.value)


@FAULT_MODELS.register("bit_flip")
class BitFlipFault(_FaultModel[BitFlip]):
    """One bit of the float32 word flips: ``w' = bits(w) XOR 2^b``, with ``b`` drawn uniformly
    from ``spec.bits`` (all 32 positions when unset) for each weight. Exponent flips can give
    ±inf or NaN; that is the fault, not an error."""

    def corrupt(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        if weight.dtype != torch.float32:
            raise DamageSpecError(
                f"bit_flip faults model IEEE-754 float32 words; the weight is {weight.dtype}",
                field="fault",
            )
        positions = torch.tensor(self.spec.bits if self.spec.bits is not None else list(range(32)))
        drawn = torch.randint(len(positions), weight.shape, generator=generator)
        flips = _BIT_MASKS[positions[drawn]].to(weight.device)
        return (weight.view(torch.int32) ^ flips).view(torch.float32)


@FAULT_MODELS.register("gaussian")
class GaussianFault(_FaultModel[Gaussian]):
    """Additive noise ``w' = w + ε``, ``ε ~ N(0, (sigma · std(W))²)`` where ``std(W)`` is the
    population standard deviation of the whole intact layer weight (0 for a single weight)."""

    def corrupt(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        scale = self.spec.sigma * weight.detach().float().std(correction=0)
        noise = torch.randn(weight.shape, generator=generator).to(weight.device)
        return (weight.float() + noise * scale).to(weight.dtype)


def fault_model(spec: FaultSpec) -> _FaultModel[Any]:
    """The fault model configured by ``spec`` (looked up by ``spec.kind``)."""
    return FAULT_MODELS.get(spec.kind)(spec)
