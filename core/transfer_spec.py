"""What a transfer experiment (:mod:`core.transfer`, the paper's §4.1) decides and reports.
Torch-free, like :mod:`core.train_spec`: the gateway can check a transfer job's datasets against
the class mapping with :func:`plan_transfer` and serve its result with these very models.

Accuracy across datasets is defined on the shared classes only: a target image of a shared
class is classified right when the model names the source class the mapping pairs it with. Images
of the target's other classes — the paper's "previously unseen" classes — are tallied
separately (what the model calls them) and never counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.cam_options import CamOptions
from core.exceptions import DatasetError
from core.results import ImageCam
from core.train_spec import TrainConfig, TrainResult

if TYPE_CHECKING:
    from core.datasets import ClassMapping

__all__ = [
    "ClassOutcome",
    "DatasetName",
    "FineTuneSummary",
    "SampleSummary",
    "TransferAccuracy",
    "TransferPlan",
    "TransferSummary",
    "overall_accuracy",
    "plan_transfer",
    "tally",
]

#: The two datasets of the paper, as named by :class:`~core.datasets.ClassMapping`.
DatasetName = Literal["ucm", "aid"]
_TITLE: dict[DatasetName, str] = {"ucm": "UC Merced", "aid": "AID"}

# --------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class TransferPlan:
    """How a model's classes meet a target dataset's.

    ``source`` names the dataset whose class names the model uses, ``target`` the other one.
    ``shared`` maps each target class the model knows under its mapped name to that model class
    (in the target folder's class order); ``unseen`` are the target classes without one (the
    "previously unseen" classes of Fig. 3); ``source_only`` the model classes no target class
    maps to — the model may still predict them, which counts as wrong on a shared image.
    """

    source: DatasetName
    target: DatasetName
    shared: dict[str, str]
    unseen: list[str]
    source_only: list[str]


def plan_transfer(
    model_classes: Sequence[str], target_classes: Sequence[str], mapping: ClassMapping
) -> TransferPlan:
    """Decide the direction of ``mapping`` from the names of ``model_classes`` (UC Merced or AID
    names) and split ``target_classes`` into shared and unseen.

    :class:`DatasetError` (``field="mapping"``) when the model's classes are on neither side of
    the mapping or on both, and (``field="target_root"``) when no target class maps to a model
    class — e.g. a UC Merced model pointed at a UC Merced folder.
    """
    source = _source_side(model_classes, mapping)
    target: DatasetName = "aid" if source == "ucm" else "ucm"
    to_source = mapping.aid_to_ucm if source == "ucm" else mapping.ucm_to_aid
    known = set(model_classes)
    shared = {name: to_source[name] for name in target_classes if to_source.get(name) in known}
    if not shared:
        raise DatasetError(
            f"no class of the target folder is the {_TITLE[target]} name of a class of the "
            f"model ({_TITLE[source]} names); expected class folders such as "
            f"{', '.join(sorted(to_source)[:3])}",
            field="target_root",
        )
    mapped = set(shared.values())
    return TransferPlan(
        source=source,
        target=target,
        shared=shared,
        unseen=[name for name in target_classes if name not in shared],
        source_only=[name for name in model_classes if name not in mapped],
    )


def _source_side(model_classes: Sequence[str], mapping: ClassMapping) -> DatasetName:
    names = set(model_classes)
    ucm = names & {*mapping.ucm_to_aid, *mapping.unseen_ucm}
    aid = names & {*mapping.aid_to_ucm, *mapping.unseen_aid}
    if ucm and aid:
        raise DatasetError(
            f"the model's classes use both UC Merced names ({', '.join(sorted(ucm)[:3])}) and "
            f"AID names ({', '.join(sorted(aid)[:3])}): the mapping's direction is ambiguous",
            field="mapping",
        )
    if not (ucm or aid):
        raise DatasetError(
            "none of the model's classes is named in the class mapping "
            f"(model classes: {_some(model_classes)})",
            field="mapping",
        )
    return "ucm" if ucm else "aid"


def _some(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


# --------------------------------------------------------------------------- JSON schema


class ClassOutcome(BaseModel):
    """One target class: how its images were classified. ``expected`` is the class a correct
    prediction names (None when the predicting model has no such class; then ``correct`` and
    ``accuracy`` are None too); ``predicted`` counts the predicted classes, most frequent
    first."""

    model_config = ConfigDict(extra="forbid")

    expected: str | None
    images: int
    correct: int | None
    accuracy: float | None
    predicted: dict[str, int]


class TransferAccuracy(BaseModel):
    """Accuracy over the images of the shared classes (``per_class``, keyed by target class);
    the images of the other target classes are reported in ``unseen`` and never counted."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float | None
    images: int
    correct: int
    per_class: dict[str, ClassOutcome]
    unseen: dict[str, ClassOutcome]


class FineTuneSummary(BaseModel):
    """Fine-tuning on the target dataset: ``before`` (the source model) and ``after`` (the
    fine-tuned one) on the same held-out test images; ``head_init`` maps each target class
    whose head row started from a source class's row to that class."""

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig
    result: TrainResult
    split: dict[str, int]
    head_init: dict[str, str]
    before: TransferAccuracy
    after: TransferAccuracy


class SampleSummary(BaseModel):
    """One sample image of the figure: its CAM results before (and after) fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    image: str
    path: str
    target_class: str
    kind: Literal["shared", "unseen"]
    expected: str | None
    before: ImageCam
    correct_before: bool | None
    after: ImageCam | None = None
    correct_after: bool | None = None


class TransferSummary(BaseModel):
    """The JSON report of one transfer experiment."""

    model_config = ConfigDict(extra="forbid")

    arch: str
    source_dataset: DatasetName
    target_dataset: DatasetName
    target_root: str
    model_classes: list[str]
    shared_classes: dict[str, str]
    unseen_classes: list[str]
    source_only_classes: list[str]
    cam: CamOptions
    before: TransferAccuracy
    fine_tune: FineTuneSummary | None = None
    samples: list[SampleSummary]
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="Artifact kind → file name, relative to the report."
    )


def tally(
    truth: Sequence[str],
    predicted: Sequence[str],
    expected: Mapping[str, str],
    shared: Collection[str],
) -> TransferAccuracy:
    """Count predictions per true class. ``expected`` gives the correct answer of each class
    the predicting model has; only the ``shared`` classes enter the accuracy."""
    counts: dict[str, Counter[str]] = {}
    for true, guess in zip(truth, predicted, strict=True):
        counts.setdefault(true, Counter())[guess] += 1
    per_class: dict[str, ClassOutcome] = {}
    unseen: dict[str, ClassOutcome] = {}
    for name, guesses in counts.items():
        answer = expected.get(name)
        images = sum(guesses.values())
        right = None if answer is None else guesses[answer]
        outcome = ClassOutcome(
            expected=answer,
            images=images,
            correct=right,
            accuracy=None if right is None else right / images,
            predicted=dict(guesses.most_common()),
        )
        (per_class if name in shared else unseen)[name] = outcome
    images = sum(o.images for o in per_class.values())
    correct = sum(o.correct or 0 for o in per_class.values())
    return TransferAccuracy(
        accuracy=correct / images if images else None,
        images=images,
        correct=correct,
        per_class=per_class,
        unseen=unseen,
    )


def overall_accuracy(accuracy: TransferAccuracy) -> float | None:
    """Accuracy over every image whose class the model has (shared and, once fine-tuned,
    formerly unseen classes)."""
    outcomes = [
        o
        for o in (*accuracy.per_class.values(), *accuracy.unseen.values())
        if o.correct is not None
    ]
    images = sum(o.images for o in outcomes)
    return sum(o.correct or 0 for o in outcomes) / images if images else None
