"""What a client may ask of a training run, and what the run reports back. Torch-free: the
gateway validates training requests and serves their results with these very models, while
``core.training`` and ``core.evaluation`` consume and produce them.

Validation errors carry the offending field in their ``loc`` (cross-field rules are attached to
the later field, e.g. ``test_fraction`` when the two held-out fractions leave nothing to train on).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

OptimizerName = Literal["sgd", "adamw"]
#: Per-epoch learning-rate schedules: cosine annealing to zero over ``epochs``; ``step``
#: multiplies the rate by ``gamma`` every ``step_size`` epochs; ``constant`` keeps it.
ScheduleName = Literal["cosine", "step", "constant"]
DeviceName = Literal["auto", "cpu", "cuda"]
#: Compute type of the forward pass: mixed precision on CUDA is bfloat16 where the GPU has it.
PrecisionName = Literal["float32", "float16", "bfloat16"]


class ScratchInit(BaseModel):
    """Random initialization (torchvision's default for the architecture)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["scratch"] = "scratch"


class ImageNetInit(BaseModel):
    """torchvision's ImageNet weights, with a new classifier head for the dataset's classes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["imagenet"] = "imagenet"


class CheckpointInit(BaseModel):
    """Start from a camres checkpoint (transfer learning when its classes differ).

    ``checkpoint`` is a file path for ``core`` and the CLI; the gateway resolves its own
    checkpoint identifiers to a path before the request reaches ``core``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["checkpoint"] = "checkpoint"
    checkpoint: str = Field(min_length=1, max_length=4096)


InitSpec = Annotated[ScratchInit | ImageNetInit | CheckpointInit, Field(discriminator="kind")]


class TrainConfig(BaseModel):
    """Hyper-parameters of one training (or masked retraining) run.

    The defaults are a plain from-scratch SGD recipe: momentum 0.9, weight decay 5e-4,
    cosine-annealed learning rate, no early stopping.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=30, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=0.05, gt=0.0, le=10.0, allow_inf_nan=False)
    optimizer: OptimizerName = "sgd"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = False
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0, allow_inf_nan=False)
    schedule: ScheduleName = "cosine"
    step_size: int = Field(default=10, ge=1, le=1000, description="Epochs per step (step).")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="Decay factor (step).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop after this many epochs without a better validation accuracy "
        "(None: off); the best weights are restored.",
    )
    seed: int = Field(default=0, ge=0, lt=2**63)
    input_size: int | None = Field(
        default=None, ge=32, le=1024, description="Square input side; None keeps the model's."
    )
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    num_workers: int = Field(default=0, ge=0, le=32, description="DataLoader processes.")
    amp: bool = Field(default=True, description="Mixed precision (CUDA only; ignored on CPU).")
    device: DeviceName = "auto"
    init: InitSpec = Field(default_factory=ScratchInit)

    @field_validator("lr", "momentum", "weight_decay", "gamma", "label_smoothing")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: ValidationInfo) -> bool:
        if value and (info.data.get("optimizer") != "sgd" or not info.data.get("momentum")):
            raise ValueError("nesterov needs optimizer 'sgd' with a momentum above 0")
        return value

    @field_validator("val_fraction")
    @classmethod
    def _validation_for_patience(cls, value: float, info: ValidationInfo) -> float:
        if value == 0.0 and info.data.get("patience") is not None:
            raise ValueError("early stopping (patience) needs a validation split above 0")
        return value

    @field_validator("test_fraction")
    @classmethod
    def _leaves_training_data(cls, value: float, info: ValidationInfo) -> float:
        held_out = value + info.data.get("val_fraction", 0.0)
        if held_out >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {held_out:g} leaves no images to train on"
            )
        return value

    @field_validator("init", mode="before")
    @classmethod
    def _init_shorthand(cls, value: Any) -> Any:
        # "scratch" / "imagenet" are accepted as shorthands for the one-field objects.
        if value in ("scratch", "imagenet"):
            return {"kind": value}
        if isinstance(value, str):
            raise ValueError(
                "init must be 'scratch', 'imagenet' or {'kind': 'checkpoint', 'checkpoint': <path>}"
            )
        return value


class EpochStats(BaseModel):
    """One epoch of a run: mean training loss and accuracy over the epoch's batches (with the
    augmentation applied), validation loss and accuracy after it (None without a validation
    set), and the learning rate the epoch ran at."""

    epoch: int = Field(ge=1)
    train_loss: float
    train_accuracy: float = Field(ge=0.0, le=1.0)
    val_loss: float | None = None
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    lr: float
    seconds: float = Field(ge=0.0)


class TrainResult(BaseModel):
    """What ``core.training.fit`` did. ``best_epoch`` is the epoch with the highest validation
    accuracy (the last epoch without a validation set); with early stopping the model holds
    that epoch's weights when ``fit`` returns."""

    history: list[EpochStats]
    best_epoch: int = Field(ge=1)
    best_val_accuracy: float | None = None
    stopped_early: bool = False
    restored_best: bool = False
    device: str
    precision: PrecisionName = "float32"
    seconds: float = Field(ge=0.0)

    @property
    def epochs_run(self) -> int:
        return len(self.history)


class Evaluation(BaseModel):
    """Classification quality on a labelled dataset.

    ``classes`` are the model's classes; ``confusion_matrix[i][j]`` counts images of true class
    ``classes[i]`` predicted as ``classes[j]`` (rows = truth). A class without test images has
    accuracy None (JSON null), not 0.
    """

    classes: list[str]
    count: int = Field(ge=0)
    accuracy: float = Field(ge=0.0, le=1.0)
    per_class_accuracy: dict[str, float | None]
    per_class_count: dict[str, int]
    confusion_matrix: list[list[int]]
    loss: float | None = Field(default=None, description="Mean cross-entropy, when computed.")
