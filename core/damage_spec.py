"""The damage specification a client sends. Torch-free: the gateway validates requests with it
without loading torch, and ``core.damage`` applies it to a model.

Paper semantics (Vasu & Savakis §3.2): D% of the N weights of the first convolution of every
block at locations D1–D4 (ResNet stages ``layer1``…``layer4``) are stuck at zero; skip
connections are never altered. Targets that depend on a model (a glob that matches nothing) are
checked when the spec is applied, and raise :class:`core.exceptions.DamageSpecError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Paper locations: the first convolution of every block of one ResNet stage.
PRESETS: dict[str, str] = {
    "D1": "layer1.*.conv1",
    "D2": "layer2.*.conv1",
    "D3": "layer3.*.conv1",
    "D4": "layer4.*.conv1",
}


class StuckAt(BaseModel):
    """Weights forced to a constant (stuck-at-zero by default: the paper's fault)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["stuck_at"] = "stuck_at"
    value: float = Field(default=0.0, allow_inf_nan=False)


class BitFlip(BaseModel):
    """IEEE-754 float32 bit flips (Ares-style): ``bits`` lists bit positions (0 = LSB of the
    mantissa, 23–30 exponent, 31 sign); one of them is flipped per damaged weight, drawn from the
    seed. Without ``bits`` any of the 32 positions may be drawn."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bit_flip"] = "bit_flip"
    bits: list[Annotated[int, Field(ge=0, le=31)]] | None = Field(default=None, min_length=1)

    @field_validator("bits")
    @classmethod
    def _distinct(cls, bits: list[int] | None) -> list[int] | None:
        # A repeated position would silently make it more likely to be drawn.
        if bits is not None and len(set(bits)) != len(bits):
            raise ValueError("bits must not repeat a position")
        return bits


class Gaussian(BaseModel):
    """Additive noise N(0, (sigma · std(layer weights))²) on each damaged weight."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gaussian"] = "gaussian"
    sigma: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)


FaultSpec = Annotated[StuckAt | BitFlip | Gaussian, Field(discriminator="kind")]


class DamageSpec(BaseModel):
    """Which weights to damage, how many, how, and from which seed."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(
        default_factory=lambda: list(PRESETS),
        min_length=1,
        description="Presets D1–D4, module names, or glob patterns over module names.",
    )
    fraction: float = Field(
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Fraction of each target layer's weights to damage.",
    )
    fault: FaultSpec = Field(default_factory=StuckAt)
    seed: int = Field(default=0, ge=0, lt=2**63)

    @field_validator("targets")
    @classmethod
    def _non_blank(cls, targets: list[str]) -> list[str]:
        cleaned = [t.strip() for t in targets]
        if any(not t for t in cleaned):
            raise ValueError("targets must not contain blank names")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("targets must not repeat a name")
        return cleaned

    def patterns(self) -> list[str]:
        """Targets with presets expanded to their module-name globs."""
        return [PRESETS.get(t, t) for t in self.targets]
