"""Where the images of a dataset folder are, and which class each belongs to. Torch-free.

The gateway validates uploaded datasets with this module and the workers read them with it
(through :mod:`core.datasets`), so both sides agree on what a dataset holds without the
gateway importing torch.

Two layouts are recognised (the paper's two datasets):

* ``ucm`` — the UC Merced Land Use archive as distributed: ``<root>/Images/<class>/*.tif``;
* ``class-folders`` — one folder per class, ``<root>/<class>/*``, which is how AID ships
  (``<root>/<Class>/*.jpg``) and how most re-encoded copies are stored.

Either may sit inside a single wrapper folder (an extracted archive's top directory). Images are
files ending in .jpg, .jpeg, .png, .tif or .tiff (any case); hidden entries and ``__MACOSX`` are
ignored. Classes are sorted by name unless an explicit class list fixes their order, which is
how a model's class indices are reproduced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.exceptions import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "Layout", "Sample", "is_image"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})

Layout = Literal["ucm", "class-folders"]


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: Path
    label: int


@dataclass(frozen=True)
class ImageFolder:
    """The classes and samples of a dataset folder (see the module docstring for layouts).

    ``root`` is the folder that holds the class folders; ``samples`` are ordered by class
    index, then file name.
    """

    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: Layout = "class-folders"

    @classmethod
    def from_path(cls, root: str | Path, classes: Sequence[str] | None = None) -> ImageFolder:
        """List a dataset folder. With ``classes``, only those class folders are used, in that
        order (label ``i`` is ``classes[i]``). :class:`DatasetError` when the folder is missing,
        unreadable or empty, has fewer than two classes, a used class folder holds no image, or
        a requested class has no folder."""
        try:
            return cls._scan(Path(root), classes)
        except OSError as exc:  # permissions, a folder removed while listing, ...
            raise DatasetError(
                f"cannot list dataset folder {str(root)!r}: {exc}", field="root"
            ) from exc

    @classmethod
    def _scan(cls, root: Path, classes: Sequence[str] | None) -> ImageFolder:
        class_root, layout = _locate(root)
        found = {p.name: p for p in _visible(class_root) if p.is_dir()}
        names = _select(found, classes, class_root)
        samples: list[Sample] = []
        for label, name in enumerate(names):
            files = sorted(p for p in _visible(found[name]) if is_image(p))
            if not files:
                raise DatasetError(
                    f"class folder {str(found[name])!r} contains no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
                    field="root",
                )
            samples.extend(Sample(path, label) for path in files)
        return cls(root=class_root, classes=names, samples=samples, layout=layout)

    def __len__(self) -> int:
        return len(self.samples)

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for sample in self.samples:
            counts[self.classes[sample.label]] += 1
        return counts


def is_image(path: Path) -> bool:
    """Whether ``path`` is a file with an image extension (the content is not checked)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _locate(root: Path) -> tuple[Path, Layout]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist", field="root")
    for folder in (root, *_wrapped(root)):
        if (folder / "Images").is_dir():
            return folder / "Images", "ucm"
        if any(is_image(f) for d in _visible(folder) if d.is_dir() for f in _visible(d)):
            return folder, "class-folders"
    return root, "class-folders"  # no images anywhere: _select reports what is missing


def _wrapped(root: Path) -> list[Path]:
    """The sole sub-folder of a root holding nothing else (an archive's top directory)."""
    entries = list(_visible(root))
    return entries if len(entries) == 1 and entries[0].is_dir() else []


def _select(found: dict[str, Path], classes: Sequence[str] | None, root: Path) -> list[str]:
    if classes is None:
        names = sorted(found)
    else:
        names = list(classes)
        if len(set(names)) != len(names):
            raise DatasetError("classes must not repeat a name", field="classes")
        unknown = [name for name in names if name not in found]
        if unknown:
            raise DatasetError(
                f"no folder for class(es) {', '.join(map(repr, unknown))} in {str(root)!r}; "
                f"available: {', '.join(sorted(found)) or 'none'}",
                field="classes",
            )
    if not found:
        raise DatasetError(f"no class folders in {str(root)!r}", field="root")
    if len(names) < 2:
        raise DatasetError(
            f"found {len(names)} class(es) ({', '.join(names)}) in {str(root)!r}; "
            "a classifier needs at least 2",
            field="classes" if classes is not None else "root",
        )
    return names


def _visible(folder: Path) -> Iterable[Path]:
    return (p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX")))
