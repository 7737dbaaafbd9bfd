"""The paper's Figure 2 pipeline as two library calls: CAMs of the intact network, of the network
with damaged weights, and of the damaged network after masked retraining
(:func:`explain_conditions`); and masked retraining of a damaged checkpoint
(:func:`retrain_checkpoint`). The CLI and the worker both call these, so a job and a command do
the same thing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from core.cam_options import CamOptions
from core.checkpoint import Checkpoint, load_model, save_checkpoint
from core.checkpoint_meta import CheckpointMeta, LineageStep
from core.damage import Masks, apply_damage, damaged, fault_values, retrain, verify_damage
from core.damage_spec import DamageSpec
from core.datasets import ImageFolder
from core.evaluation import evaluate
from core.exceptions import CheckpointError, InputError
from core.explain import Explanation, explain
from core.progress import Progress, ProgressCallback, ShouldStop, check_stop, report
from core.train_spec import Evaluation, TrainConfig, TrainResult
from core.training_data import DataSplits, SplitSettings, load_splits, training_split

Condition = Literal["intact", "damaged", "retrained"]


@dataclass(frozen=True)
class RetrainPlan:
    """Masked retraining on the image folder ``dataset_root`` (the model's classes) with
    ``config``."""

    dataset_root: Path
    config: TrainConfig


@dataclass
class ConditionsResult:
    """Per condition, one :class:`Explanation` per input image (input order); ``damage`` and
    ``retrain`` summarize what was done (JSON-ready), None when not asked for."""

    explanations: dict[Condition, list[Explanation]]
    damage: dict[str, Any] | None = None
    retrain: dict[str, Any] | None = None


@dataclass(frozen=True)
class RetrainOutcome:
    """A retrained checkpoint: its ``digest``, how training went, whether every damaged weight
    kept its fault value (``damage_check``), and test accuracy before and after."""

    digest: str
    result: TrainResult
    damage_check: dict[str, Any]
    before: Evaluation | None
    after: Evaluation | None


def explain_conditions(
    model: nn.Module,
    meta: CheckpointMeta,
    images: Sequence[tuple[str, Image.Image]],
    options: CamOptions,
    *,
    damage: DamageSpec | None = None,
    retrain_plan: RetrainPlan | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> ConditionsResult:
    """CAMs of ``images`` for the intact ``model``, then under ``damage``, then after masked
    retraining (paper Figure 2 and Figure 5's columns).

    ``model`` is left exactly as it was: damage alone is applied in place and restored
    (:func:`core.damage.damaged`), while retraining — which changes the undamaged weights too —
    runs on one private copy, so a worker can keep serving its cached model.
    """
    if retrain_plan is not None and damage is None:
        raise InputError(
            "retraining needs a damage spec: it restores a damaged network", field="retrain"
        )
    stages = 1 + (damage is not None) + (retrain_plan is not None) * 2
    stage = _StageProgress(progress, stages)

    def cams(condition: str) -> list[Explanation]:
        return explain(
            model_now, meta, images, options, device=device,
            progress=stage.child(condition), should_stop=should_stop,
        )  # fmt: skip

    model_now = model
    out = ConditionsResult(explanations={"intact": cams("intact")})
    if damage is None:
        return out
    if retrain_plan is None:
        with damaged(model, damage) as applied:
            out.explanations["damaged"] = cams("damaged")
            out.damage = _damage_summary(damage, applied.masks)
        return out

    model_now = copy.deepcopy(model)
    applied = apply_damage(model_now, damage)
    out.damage = _damage_summary(damage, applied.masks)
    out.explanations["damaged"] = cams("damaged")
    check_stop(should_stop, "retrain")
    result = _retrain_in_place(model_now, meta, applied.masks, retrain_plan, stage, should_stop)
    out.retrain = {
        "result": result.model_dump(mode="json"),
        "damage_check": applied.verify().as_dict(),
    }
    out.explanations["retrained"] = cams("retrained")
    return out


def retrain_checkpoint(
    src_path: str | Path,
    dataset_root: str | Path,
    config: TrainConfig,
    dst_path: str | Path,
    *,
    progress: ProgressCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> RetrainOutcome:
    """Masked retraining of the damaged checkpoint ``src_path`` on ``dataset_root``; writes the
    result (same damage masks, a ``retrain`` lineage step) to ``dst_path``.

    The images are split as the checkpoint's training split was (recorded in its lineage) when
    it has one, so the test accuracies are on images the model never trained on.
    """
    model, ckpt = load_model(src_path, device=_device(config))
    if not ckpt.damage_masks:
        raise CheckpointError(
            f"{Path(src_path).name} has no damage masks: damage it first", field="src_path"
        )
    data = _splits(dataset_root, ckpt.meta, config)

    def test_accuracy() -> Evaluation | None:
        if data.test is None:
            return None
        return evaluate(model, data.test, classes=ckpt.meta.classes, device=config.device)

    before = test_accuracy()
    values = fault_values(model, ckpt.damage_masks)
    result = retrain(
        model, ckpt.damage_masks, data.train, data.val, config,
        progress=progress, should_stop=should_stop,
    )  # fmt: skip
    check = verify_damage(model, ckpt.damage_masks, values).as_dict()
    after = test_accuracy()
    digest = save_checkpoint(
        dst_path, model, _retrained_meta(ckpt, config, after), damage_masks=ckpt.damage_masks
    )
    return RetrainOutcome(digest, result, check, before, after)


# --------------------------------------------------------------------------- helpers


class _StageProgress:
    """Maps each stage's own 0→1 progress onto an equal slice of the whole job."""

    def __init__(self, callback: ProgressCallback | None, stages: int) -> None:
        self._callback = callback
        self._stages = stages
        self._done = 0

    def child(self, stage: str) -> ProgressCallback | None:
        if self._callback is None:
            return None
        start, width = self._done / self._stages, 1 / self._stages
        self._done += 1
        callback = self._callback

        def relay(p: Progress) -> None:
            callback(Progress(start + width * p.fraction, stage, p.message, p.metrics))

        report(callback, Progress(start, stage, f"starting {stage}"))
        return relay


def _retrain_in_place(
    model: nn.Module,
    meta: CheckpointMeta,
    masks: Masks,
    plan: RetrainPlan,
    stage: _StageProgress,
    should_stop: ShouldStop | None,
) -> TrainResult:
    data = _splits(plan.dataset_root, meta, plan.config)
    return retrain(
        model, masks, data.train, data.val, plan.config,
        progress=stage.child("retrain"), should_stop=should_stop,
    )  # fmt: skip


def _splits(root: str | Path, meta: CheckpointMeta, config: TrainConfig) -> DataSplits:
    folder = ImageFolder.from_path(root, classes=meta.classes)
    split = training_split(meta) or SplitSettings(
        config.seed, config.val_fraction, config.test_fraction
    )
    return load_splits(
        folder,
        meta.preprocessing,
        val_fraction=split.val_fraction,
        test_fraction=split.test_fraction,
        seed=split.seed,
    )


def _damage_summary(spec: DamageSpec, masks: Masks) -> dict[str, Any]:
    layers = {name: {"damaged": int(m.sum()), "weights": m.numel()} for name, m in masks.items()}
    return {
        "spec": spec.model_dump(mode="json"),
        "layers": layers,
        "damaged": sum(v["damaged"] for v in layers.values()),
        "weights": sum(v["weights"] for v in layers.values()),
    }


def _retrained_meta(
    ckpt: Checkpoint, config: TrainConfig, after: Evaluation | None
) -> CheckpointMeta:
    step = LineageStep(
        op="retrain", parent_digest=ckpt.digest, params={"config": config.model_dump(mode="json")}
    )
    provenance = {**ckpt.meta.provenance, "test_accuracy": after.accuracy if after else None}
    return ckpt.meta.model_copy(
        update={"lineage": [*ckpt.meta.lineage, step], "provenance": provenance}
    )


def _device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device
