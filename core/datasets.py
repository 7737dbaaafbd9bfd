"""Aerial scene datasets on disk: torch datasets, stratified splits, and the UCM↔AID class map.

Which files a dataset folder holds and which class each belongs to (the ``ucm`` and
``class-folders`` layouts, image extensions, hidden entries) is torch-free and lives in
:mod:`core.layout`; :class:`ImageFolder` and :class:`Sample` are re-exported here.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from core.exceptions import DatasetError, InputError, UnknownClassError
from core.images import DEFAULT_MAX_PIXELS, decode_image
from core.layout import IMAGE_EXTENSIONS, ImageFolder, Layout, Sample
from core.transforms import ImageTransform

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassMapping",
    "ImageDataset",
    "ImageFolder",
    "Layout",
    "Sample",
    "Split",
    "stratified_split",
]


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """A torch Dataset over samples: item ``i`` is ``(transform(image), label)``.

    Images are decoded with :func:`core.images.decode_image`; an unreadable file raises
    :class:`~core.exceptions.ImageDecodeError` naming its path.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        image = decode_image(sample.path, max_pixels=self.max_pixels, name=str(sample.path))
        return self.transform(image), sample.label

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (for samplers and class weights), without decoding."""
        return [sample.label for sample in self.samples]


@dataclass(frozen=True)
class Split:
    """Disjoint train/validation/test subsets of one sample list."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def stratified_split(
    samples: Sequence[Sample], val: float = 0.15, test: float = 0.15, seed: int = 0
) -> Split:
    """Split ``samples`` per class into train/val/test with the given fractions.

    Each class is shuffled on its own from ``seed`` and the class label, so the split is
    reproducible and independent of the input order. A class gets ``round(n·val)`` validation and
    ``round(n·test)`` test samples, raised to one each when it has enough samples for every
    split to get one, and always keeps at least one training sample.
    """
    for name, fraction in (("val", val), ("test", test)):
        if not (isinstance(fraction, int | float) and 0.0 <= fraction < 1.0):
            raise InputError(f"{name} must be a fraction in [0, 1), got {fraction!r}", field=name)
    if val + test >= 1.0:
        raise InputError(f"val + test must be below 1, got {val + test}", field="test")
    if not samples:
        raise DatasetError("cannot split an empty sample list", field="samples")
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    train: list[Sample] = []
    held_val: list[Sample] = []
    held_test: list[Sample] = []
    for label, members in sorted(by_class.items()):
        members = sorted(members, key=lambda s: str(s.path))
        random.Random(f"{seed}/{label}").shuffle(members)
        n_val, n_test = _allocate(len(members), val, test)
        held_val += members[:n_val]
        held_test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    return Split(train=_ordered(train), val=_ordered(held_val), test=_ordered(held_test))


def _allocate(n: int, val: float, test: float) -> tuple[int, int]:
    """Validation and test counts for a class of ``n`` samples."""
    n_val, n_test = math.floor(n * val + 0.5), math.floor(n * test + 0.5)
    represented = n >= 1 + (val > 0) + (test > 0)
    min_val = 1 if represented and val > 0 else 0
    min_test = 1 if represented and test > 0 else 0
    n_val, n_test = max(n_val, min_val), max(n_test, min_test)
    while n_val + n_test > n - 1:  # training keeps a sample: shrink the larger held-out part
        if n_test > min_test and (n_test >= n_val or n_val <= min_val):
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _ordered(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.label, str(s.path)))


@dataclass(frozen=True)
class ClassMapping:
    """Class correspondence between UC Merced and AID (``ucm_aid_classes.json``).

    ``ucm_to_aid`` maps the classes both datasets share (the paper's 14); ``unseen_ucm`` and
    ``unseen_aid`` are classes only one dataset has (the "previously unseen" classes of the
    paper's Fig. 3).
    """

    ucm_to_aid: dict[str, str]
    unseen_ucm: tuple[str, ...] = ()
    unseen_aid: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.ucm_to_aid.values())) != len(self.ucm_to_aid):
            raise DatasetError("the class mapping maps two classes to one", field="class_mapping")

    @classmethod
    def load(cls, path: str | Path) -> ClassMapping:
        """Read ``{"ucm_to_aid": {...}, "unseen": {"ucm": [...], "aid": [...]}}``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            mapping = data["ucm_to_aid"]
            unseen = data.get("unseen", {})
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise TypeError("ucm_to_aid must map names to names")
            return cls(
                dict(mapping),
                tuple(map(str, unseen.get("ucm", ()))),
                tuple(map(str, unseen.get("aid", ()))),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(
                f"cannot read class mapping {str(path)!r}: {exc}", field="class_mapping"
            ) from exc

    @property
    def aid_to_ucm(self) -> dict[str, str]:
        return {aid: ucm for ucm, aid in self.ucm_to_aid.items()}

    def to_aid(self, ucm_name: str) -> str:
        """The AID name of a shared UCM class (:class:`UnknownClassError` otherwise)."""
        return self._lookup(self.ucm_to_aid, ucm_name, "UC Merced")

    def to_ucm(self, aid_name: str) -> str:
        """The UCM name of a shared AID class (:class:`UnknownClassError` otherwise)."""
        return self._lookup(self.aid_to_ucm, aid_name, "AID")

    @staticmethod
    def _lookup(table: dict[str, str], name: str, dataset: str) -> str:
        try:
            return table[name]
        except KeyError:
            raise UnknownClassError(
                f"{name!r} is not a {dataset} class shared by both datasets; "
                f"shared: {', '.join(sorted(table))}",
                field="classes",
            ) from None

    def align(self, folder: ImageFolder, model_classes: Sequence[str]) -> ImageFolder:
        """Relabel ``folder`` in a model's class space, e.g. AID images for a UCM model.

        A folder class keeps its samples when the model has it under the same name or under its
        name in the other dataset; other classes are dropped (they are unseen by the model).
        The result's ``classes`` are ``model_classes``, some possibly without samples.
        """
        index = {name: i for i, name in enumerate(model_classes)}
        both_ways = {**self.ucm_to_aid, **self.aid_to_ucm}
        relabel: dict[int, int] = {}
        for label, name in enumerate(folder.classes):
            target = name if name in index else both_ways.get(name)
            if target in index:
                relabel[label] = index[target]
        if not relabel:
            raise DatasetError(
                f"no class of {str(folder.root)!r} corresponds to a model class", field="classes"
            )
        samples = [Sample(s.path, relabel[s.label]) for s in folder.samples if s.label in relabel]
        return ImageFolder(folder.root, list(model_classes), samples, folder.layout)
