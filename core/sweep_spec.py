"""What a damage sweep is asked to do, and the table it produces. Torch-free: the gateway can
validate a sweep request and serve its results without importing torch.

A sweep (Vasu & Savakis §4.2) damages one *location* at a time (D1–D4: the first convolution of
every block of ResNet stage 1–4) at every damage *fraction* (5 % … 95 % in steps of 5 %), with
``trials`` independent draws of the damaged weights per level (seeds ``seed``, ``seed + 1``, …;
for one seed the damaged sets are nested across fractions, see :mod:`core.damage`), and compares
each damaged network with the intact one: accuracy, label flips, and the drift of its class
activation maps (:mod:`core.drift`). At chosen levels the damaged network is also retrained with
its damage held (§3.2) and compared again.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.cam_options import CamMethodName
from core.damage_spec import PRESETS, FaultSpec, StuckAt
from core.exceptions import InputError
from core.train_spec import TrainConfig

__all__ = [
    "DEFAULT_FRACTIONS",
    "DRIFT_METRICS",
    "CamClass",
    "CellMetrics",
    "Estimate",
    "SummaryRow",
    "SweepConfig",
    "SweepReport",
    "SweepRow",
    "parse_fractions",
]

#: The paper's damage levels: 5 % to 95 % in steps of 5 %.
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))

#: Drift metrics of :class:`CellMetrics`, in table order (see :mod:`core.drift`).
DRIFT_METRICS: tuple[str, ...] = ("cam_correlation", "har_box_iou", "mask_iou", "peak_shift_px")

#: Which class's map is compared: each network's own top-1 class (what Figure 5 shows, so a
#: flipped label explains itself), or the image's true class (drift of the evidence for one
#: fixed class).
CamClass = Literal["predicted", "label"]

_MAX_LEVELS = 1000


def parse_fractions(text: str) -> list[float]:
    """Damage fractions from ``"start:stop:step"`` (both ends included, exact decimal steps, so
    ``"0.05:0.95:0.05"`` gives the 19 paper levels) or a comma-separated list ``"0.1,0.5"``.
    :class:`InputError` on ``fractions`` for anything else."""
    try:
        if ":" not in text:
            levels = [Decimal(part.strip()) for part in text.split(",") if part.strip()]
        else:
            start, stop, step = (Decimal(part.strip()) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError("need start <= stop and a positive step")
            count = int((stop - start) / step) + 1
            if count > _MAX_LEVELS:
                raise ValueError(f"more than {_MAX_LEVELS} levels")
            levels = [start + i * step for i in range(count)]
    except (InvalidOperation, ValueError) as exc:
        raise InputError(
            f"fractions must be 'start:stop:step' or 'a,b,c', got {text!r} ({exc})",
            field="fractions",
        ) from None
    if not levels:
        raise InputError("no damage fraction given", field="fractions")
    return [float(level) for level in levels]


class SweepConfig(BaseModel):
    """One damage sweep. ``retrain_at`` lists the fractions (a subset of ``fractions``) at which
    every location and trial is also retrained with ``retrain`` (masked retraining, §3.2)."""

    model_config = ConfigDict(extra="forbid")

    locations: list[str] = Field(
        default_factory=lambda: list(PRESETS),
        min_length=1,
        description="Presets D1–D4, module names or globs; each is swept on its own.",
    )
    fractions: list[float] = Field(default_factory=lambda: list(DEFAULT_FRACTIONS), min_length=1)
    trials: int = Field(default=3, ge=1, le=100, description="Seeds per (location, fraction).")
    # Trial t damages with seed + t, which must stay a valid DamageSpec seed (< 2**63).
    seed: int = Field(default=0, ge=0, lt=2**63 - 100, description="Trial t uses seed + t.")
    fault: FaultSpec = Field(default_factory=StuckAt)
    method: CamMethodName = "cam"
    cam_class: CamClass = "predicted"
    har_threshold: float = Field(default=0.2, gt=0.0, lt=1.0)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0, description="CI level over trials.")
    retrain_at: list[float] = Field(default_factory=list)
    retrain: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=3, lr=0.01),
        description="Masked retraining settings (used only with retrain_at).",
    )
    batch_size: int = Field(default=32, ge=1, le=4096)
    cache_mb: float = Field(
        default=512.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Budget (MiB) for the activations cached before a damaged layer.",
    )

    @field_validator("locations")
    @classmethod
    def _clean_locations(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip() for v in value]
        if any(not v for v in cleaned) or len(set(cleaned)) != len(cleaned):
            raise ValueError("locations must be distinct, non-blank names")
        return cleaned

    @field_validator("fractions", "retrain_at")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if any(not (math.isfinite(v) and 0.0 < v <= 1.0) for v in value):
            raise ValueError("damage fractions must lie in (0, 1]")
        if len(set(value)) != len(value):
            raise ValueError("damage fractions must not repeat")
        return sorted(value)

    @field_validator("retrain_at")
    @classmethod
    def _retrain_levels_are_swept(cls, value: list[float], info: ValidationInfo) -> list[float]:
        missing = sorted(set(value) - set(info.data.get("fractions", value)))
        if missing:
            raise ValueError(f"levels {missing} are not among the swept fractions")
        return value

    @property
    def cells(self) -> int:
        """Damaged networks evaluated: locations × fractions × trials."""
        return len(self.locations) * len(self.fractions) * self.trials

    @property
    def units(self) -> int:
        """Work units of a run (its progress denominator): every cell, plus every retrained
        cell again."""
        return self.cells + len(self.locations) * len(self.retrain_at) * self.trials

    def subset(self, locations: list[str], fractions: list[float]) -> SweepConfig:
        """The same sweep restricted to ``locations`` × ``fractions`` (``retrain_at`` alike).
        Its cells are cells of this sweep with the same results: a cell's damage depends only
        on its location, fraction and seed (nested masks are drawn per fraction, see
        :mod:`core.damage`), and its metrics only on the intact network and that damage."""
        unknown = sorted(set(locations) - set(self.locations))
        unknown += sorted(str(f) for f in set(fractions) - set(self.fractions))
        if unknown or not locations or not fractions:
            raise InputError(
                f"a part must be a non-empty subset of the sweep; not in it: {unknown}",
                field="config",
            )
        data = self.model_dump()
        data.update(
            locations=[loc for loc in self.locations if loc in locations],
            fractions=[f for f in self.fractions if f in fractions],
            retrain_at=[f for f in self.retrain_at if f in fractions],
        )
        return SweepConfig.model_validate(data)

    def split(self, parts: int) -> list[SweepConfig]:
        """At most ``parts`` disjoint subsets covering every cell once, to run on several
        workers. Locations are the natural shard (the fast strategy caches the activations
        before a location's first damaged layer, :mod:`core.sweep`); with more parts than
        locations, a location's fractions are cut into contiguous ranges (each range recomputes
        that cache once). Parts are in config order: location, then fraction."""
        if parts < 1:
            raise InputError(f"parts must be at least 1, got {parts}", field="parts")
        locations, fractions = self.locations, self.fractions
        parts = min(parts, len(locations) * len(fractions))
        if parts <= len(locations):
            return [self.subset(group, fractions) for group in _chunks(locations, parts)]
        base, extra = divmod(parts, len(locations))
        return [
            self.subset([location], chunk)
            for index, location in enumerate(locations)
            for chunk in _chunks(fractions, base + (1 if index < extra else 0))
        ]


def _chunks(items: list[Any], count: int) -> list[list[Any]]:
    """``items`` cut into ``count`` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs


class CellMetrics(BaseModel):
    """How one network compares with the intact one on the evaluation images.

    Drift metrics are means over images of per-image values (:mod:`core.drift`); an image whose
    value is undefined (a flat map has no peak, two empty masks no IoU) is left out, and a mean
    over no image is None.
    """

    model_config = ConfigDict(extra="forbid")

    accuracy: float = Field(ge=0.0, le=1.0)
    flip_rate: float = Field(ge=0.0, le=1.0, description="Share of labels that differ.")
    cam_correlation: float | None = None
    har_box_iou: float | None = None
    mask_iou: float | None = None
    peak_shift_px: float | None = None


class SweepRow(CellMetrics):
    """One cell of the sweep: a location, a damage fraction and a trial (seed)."""

    location: str
    fraction: float
    trial: int = Field(ge=0)
    seed: int = Field(ge=0)
    damaged_weights: int = Field(ge=0)
    target_weights: int = Field(ge=0, description="Weights of the targeted layers.")
    retrained: CellMetrics | None = Field(
        default=None, description="The same comparison after masked retraining."
    )
    retrain_epochs: int | None = None


class Estimate(BaseModel):
    """Mean over ``n`` trials and its two-sided confidence interval (Student's t, n − 1 degrees
    of freedom); the interval is None with fewer than two trials."""

    model_config = ConfigDict(extra="forbid")

    mean: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = Field(ge=0)


class SummaryRow(BaseModel):
    """The trials of one (location, fraction) combined; ``metrics`` maps a :class:`CellMetrics`
    field (``retrained_<field>`` after retraining) to its :class:`Estimate`."""

    model_config = ConfigDict(extra="forbid")

    location: str
    fraction: float
    trials: int
    metrics: dict[str, Estimate]


class SweepReport(BaseModel):
    """Everything a sweep writes to ``sweep.json``."""

    model_config = ConfigDict(extra="forbid")

    config: SweepConfig
    arch: str
    classes: list[str]
    images: int = Field(ge=1)
    intact_accuracy: float = Field(ge=0.0, le=1.0)
    strategy: str
    seconds: float = Field(ge=0.0)
    rows: list[SweepRow]
    summary: list[SummaryRow]
    provenance: dict[str, str] = Field(default_factory=dict)
