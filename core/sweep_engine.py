"""The machinery of :mod:`core.sweep`: cells, the intact reference, CAM extraction per batch,
and the two strategies that evaluate the cells of one location (see :mod:`core.sweep` for what
they compute and why they agree bit for bit)."""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.cam import CAM_METHODS
from core.damage import Damage, apply_damage, damaged, resolve_targets
from core.damage_spec import DamageSpec
from core.drift import MapSet, cam_drift, prepare_maps
from core.exceptions import DamageSpecError, DatasetError
from core.hooks import get_submodule
from core.models import ArchSpec
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.sweep_data import EvalSet
from core.sweep_spec import CellMetrics, SweepConfig
from core.sweep_stages import NET, Stages

__all__ = [
    "RUNNERS",
    "Cell",
    "CellKey",
    "CellOutput",
    "Evaluated",
    "Explainer",
    "Reference",
    "SweepContext",
    "device_of",
]


@dataclass(frozen=True, order=True)
class CellKey:
    """One cell of a sweep."""

    location: str
    fraction: float
    trial: int


@dataclass(frozen=True)
class CellOutput:
    """What a network gives on the evaluation set: top-1 ``predictions`` (N,), the explained
    class ``targets`` (N,) and their raw maps (N, h, w) at feature resolution, on the CPU."""

    predictions: Tensor
    targets: Tensor
    maps: Tensor

    @staticmethod
    def concat(parts: Sequence[CellOutput]) -> CellOutput:
        return CellOutput(
            predictions=torch.cat([p.predictions for p in parts]),
            targets=torch.cat([p.targets for p in parts]),
            maps=torch.cat([p.maps for p in parts]),
        )


@dataclass(frozen=True)
class Cell:
    """A cell and the damage it applies."""

    key: CellKey
    spec: DamageSpec


@dataclass(frozen=True)
class Reference:
    """The intact network's output and its described maps: what cells are compared with."""

    output: CellOutput
    maps: MapSet


@dataclass(frozen=True)
class Evaluated:
    """A cell's output, the reference it is compared with, and how many weights it damaged."""

    cell: Cell
    output: CellOutput
    reference: Reference
    damaged_weights: int
    target_weights: int


class Explainer:
    """A CAM extractor (:data:`core.cam.CAM_METHODS`) on ``module`` giving a :class:`CellOutput`
    per batch; ``prefix`` is prepended to the layer names (``"net."`` for a resumed network)."""

    def __init__(self, ctx: SweepContext, module: nn.Module, prefix: str = "") -> None:
        arch = ctx.arch
        fc = None if arch.fc_layer is None else prefix + arch.fc_layer
        method = CAM_METHODS.get(ctx.config.method)
        self._extract = method(module, prefix + arch.feature_layer, fc)
        self._ctx = ctx

    def __call__(self, x: Tensor, labels: Tensor) -> CellOutput:
        if self._ctx.config.cam_class == "predicted":
            batch = self._extract(x, top_k=1)
            targets, maps = batch.targets[:, 0], batch.maps[:, 0]
        else:
            batch = self._extract(x, classes=range(self._ctx.num_classes))
            targets = labels.to(batch.maps.device)
            maps = batch.maps[torch.arange(len(targets), device=targets.device), targets]
        return CellOutput(batch.logits.argmax(dim=1).cpu(), targets.cpu(), maps.cpu())

    def over_all(self, device: torch.device) -> CellOutput:
        """The output over the whole evaluation set, batch by batch."""
        return CellOutput.concat([self(x.to(device), y) for x, y in self._ctx.batches()])


class SweepContext:
    """One run's shared state: model, settings, the intact reference, progress bookkeeping."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        eval_set: EvalSet,
        config: SweepConfig,
        progress: ProgressCallback | None,
        should_stop: ShouldStop | None,
    ) -> None:
        self.model, self.arch, self.eval_set, self.config = model, arch, eval_set, config
        self.progress, self.should_stop = progress, should_stop
        self.device = device_of(model)
        head = get_submodule(model, arch.logits_layer, field="arch")
        self.num_classes = int(getattr(head, "out_features", 0))
        labels = eval_set.labels
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise DatasetError(
                f"labels must lie in [0, {self.num_classes}); relabel the images into the "
                "model's classes first",
                field="eval_set",
            )
        self.stages = Stages(model, whole=[arch.feature_layer])
        self.size: tuple[int, int] = (eval_set.inputs.shape[-2], eval_set.inputs.shape[-1])
        self.total_units = config.units
        self.done_units = 0.0
        self.timings: dict[str, float] = {}

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        size = self.config.batch_size
        for start in range(0, len(self.eval_set), size):
            yield (
                self.eval_set.inputs[start : start + size],
                self.eval_set.labels[start : start + size],
            )

    def reference(self, output: CellOutput) -> Reference:
        return Reference(
            output, prepare_maps(output.maps, self.size, threshold=self.config.har_threshold)
        )

    def metrics(self, output: CellOutput, reference: Reference) -> CellMetrics:
        started = time.perf_counter()
        labels = self.eval_set.labels
        maps = prepare_maps(output.maps, self.size, threshold=self.config.har_threshold)
        metrics = CellMetrics(
            accuracy=float((output.predictions == labels).double().mean()),
            flip_rate=float((output.predictions != reference.output.predictions).double().mean()),
            **cam_drift(reference.maps, maps).means(),
        )
        self.add_time("metrics_s", time.perf_counter() - started)
        return metrics

    def cells(self, location: str) -> list[Cell]:
        config = self.config
        return [
            Cell(
                CellKey(location, fraction, trial),
                DamageSpec(
                    targets=[location],
                    fraction=fraction,
                    fault=config.fault,
                    seed=config.seed + trial,
                ),
            )
            for trial in range(config.trials)
            for fraction in config.fractions
        ]

    def targets(self, location: str) -> list[str]:
        spec = DamageSpec(targets=[location], fraction=1.0)
        try:
            return resolve_targets(self.model, spec)
        except DamageSpecError as exc:
            raise DamageSpecError(exc.message, field="locations") from None

    def advance(self, units: float, stage: str, key: CellKey, **metrics: object) -> None:
        self.done_units += units
        report(
            self.progress,
            Progress(
                min(self.done_units / self.total_units, 1.0),
                stage,
                f"{key.location} {key.fraction:.0%} trial {key.trial}",
                {"location": key.location, "fraction": key.fraction, "trial": key.trial, **metrics},
            ),
        )

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


def device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _counts(damage: Damage) -> tuple[int, int]:
    masks = damage.masks.values()
    return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)


# --------------------------------------------------------------------------- strategies


class _Runner(ABC):
    """How the cells of one location are evaluated."""

    def __init__(self, ctx: SweepContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def run(
        self, location: str, cells: Sequence[Cell], reference: Reference
    ) -> Iterator[Evaluated]:
        """Evaluate ``cells`` (all at ``location``), yielding each as soon as it is complete."""


class _Fast(_Runner):
    """Prefix cached per chunk of images, suffix rerun per cell, damage applied in place."""

    def run(
        self, location: str, cells: Sequence[Cell], reference: Reference
    ) -> Iterator[Evaluated]:
        ctx = self.ctx
        stages = ctx.stages
        start = stages.boundary([*ctx.targets(location), ctx.arch.feature_layer])
        explain = Explainer(ctx, stages.resumed(start), prefix=f"{NET}.")
        chunks = _Chunks(ctx, start)
        pending: dict[CellKey, list[CellOutput]] = {cell.key: [] for cell in cells}
        for chunk, (cached, last) in enumerate(chunks):
            for cell in cells:
                check_stop(ctx.should_stop, "sweep")
                with damaged(ctx.model, cell.spec) as damage:
                    parts = [explain(x, labels) for x, labels in cached]
                pending[cell.key].append(CellOutput.concat(parts))
                ctx.advance(1 / chunks.count, "sweep", cell.key, chunk=chunk)
                if last:
                    output = CellOutput.concat(pending.pop(cell.key))
                    yield Evaluated(cell, output, reference, *_counts(damage))
            del cached  # so the next chunk does not coexist with this one


class _Chunks:
    """The evaluation set as chunks of cached activations entering step ``start``: whole
    batches, as many per chunk as fit ``config.cache_mb`` (at least one). Iterating yields
    (list of (activations, labels), is-last-chunk); a chunk is freed when the next is made."""

    def __init__(self, ctx: SweepContext, start: int) -> None:
        self.ctx, self.start = ctx, start
        self.batches = list(ctx.batches())
        self.per_chunk = len(self.batches)
        if start > 0:
            probe = self._prefix(self.batches[0][0][:1])  # one image: the size per image
            batch_bytes = probe.numel() * probe.element_size() * ctx.config.batch_size
            self.per_chunk = max(1, int(ctx.config.cache_mb * 2**20 // batch_bytes))
        self.count = -(-len(self.batches) // self.per_chunk)

    def _prefix(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.ctx.stages.prefix(x.to(self.ctx.device), self.start)

    def __iter__(self) -> Iterator[tuple[list[tuple[Tensor, Tensor]], bool]]:
        for chunk in range(self.count):
            group = self.batches[chunk * self.per_chunk : (chunk + 1) * self.per_chunk]
            cached = [(self._prefix(x), labels) for x, labels in group]
            yield cached, chunk == self.count - 1
            del cached


class _Naive(_Runner):
    """Every cell on its own: a deep copy of the model, damaged, and a full forward pass of the
    intact and the damaged network over every image (no state shared between cells)."""

    def run(
        self, location: str, cells: Sequence[Cell], reference: Reference
    ) -> Iterator[Evaluated]:
        ctx = self.ctx
        ctx.targets(location)  # same validation as the fast path
        for cell in cells:
            check_stop(ctx.should_stop, "sweep")
            started = time.perf_counter()
            own_reference = ctx.reference(Explainer(ctx, ctx.model).over_all(ctx.device))
            ctx.add_time("naive_intact_s", time.perf_counter() - started)
            network = copy.deepcopy(ctx.model)
            damage = apply_damage(network, cell.spec)
            output = Explainer(ctx, network).over_all(ctx.device)
            del network
            ctx.advance(1, "sweep", cell.key)
            yield Evaluated(cell, output, own_reference, *_counts(damage))


RUNNERS: dict[str, type[_Runner]] = {"fast": _Fast, "naive": _Naive}
