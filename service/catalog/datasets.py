"""The dataset catalog: labelled image folders on the shared data volume.

A dataset is a folder of class folders (``<class>/<image>``), possibly wrapped in single
folders — ``UCMerced_LandUse/Images/<class>/*.tif`` as distributed, ``AID/<Class>/*.jpg``.
Uploaded zips are extracted under ``datasets/<id>/data``; registered folders stay where they
are. ``datasets/<id>/dataset.json`` holds the :class:`DatasetInfo` and the resolved root that
workers hand to ``core.datasets``. Torch-free: images are checked from their headers with PIL.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from core.exceptions import DatasetError
from service.catalog.archive import ArchiveLimits, extract_zip, remove_tree

#: File suffixes read as images: ``core.datasets.IMAGE_EXTENSIONS``, which cannot be imported
#: here without torch (a test keeps the two equal).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})

_DATASET_ID = re.compile(r"^ds-[0-9a-f]{32}$")


class DatasetInfo(BaseModel):
    """What the API tells about a dataset."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    classes: list[str]
    counts: dict[str, int] = Field(description="Images per class.")
    num_images: int
    created_at: datetime
    source: str = Field(description='"upload" or "registered".')


class _StoredDataset(BaseModel):
    """The catalog's file: the public info plus where the class folders are."""

    info: DatasetInfo
    root: str


class Layout(BaseModel):
    """A validated class-folder layout: the folder holding the class folders and their
    images (paths relative to ``root``), classes sorted by name."""

    root: Path
    images: dict[str, list[str]]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def find_class_root(folder: Path) -> Path:
    """Descend through single wrapper folders (``UCMerced_LandUse/Images``) to the folder
    whose sub-folders are the classes."""
    current = folder
    while True:
        subdirs = _subdirs(current)
        if len(subdirs) != 1 or _image_files(current):
            return current
        current = subdirs[0]


def scan_layout(folder: Path, *, max_pixels: int) -> Layout:
    """Validate a class-folder dataset: at least two classes, none empty, every image
    readable (header) and within ``max_pixels``. :class:`DatasetError` otherwise."""
    root = find_class_root(folder)
    images: dict[str, list[str]] = {}
    for class_dir in _subdirs(root):
        files = _image_files(class_dir)
        if not files:
            raise DatasetError(
                f"class folder {class_dir.name!r} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})",
                field="file",
            )
        for path in files:
            _check_image(path, root, max_pixels)
        images[class_dir.name] = [str(p.relative_to(root)) for p in files]
    if len(images) < 2:
        found = ", ".join(images) or "none"
        raise DatasetError(
            f"a dataset needs at least 2 class folders with images; found {found}",
            field="file",
        )
    return Layout(root=root, images=images)


def _check_image(path: Path, root: Path, max_pixels: int) -> None:
    name = str(path.relative_to(root))
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{name!r} is not a readable image: {exc}", field="file") from exc
    if width * height > max_pixels:
        raise DatasetError(
            f"{name!r} is {width}×{height} pixels, over the limit of {max_pixels:,}",
            field="file",
        )


class DatasetCatalog:
    """Datasets under ``root`` (one folder each)."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir

    def _folder(self, dataset_id: str) -> Path | None:
        return self.root / dataset_id if _DATASET_ID.match(dataset_id) else None

    def _load(self, dataset_id: str) -> _StoredDataset | None:
        folder = self._folder(dataset_id)
        if folder is None:
            return None
        try:
            return _StoredDataset.model_validate_json((folder / "dataset.json").read_bytes())
        except FileNotFoundError:
            return None

    def get(self, dataset_id: str) -> DatasetInfo | None:
        stored = self._load(dataset_id)
        return None if stored is None else stored.info

    def images_root(self, dataset_id: str) -> Path | None:
        """The folder holding the class folders (what ``core.datasets`` reads)."""
        stored = self._load(dataset_id)
        return None if stored is None else Path(stored.root)

    def list(self) -> list[DatasetInfo]:
        infos = []
        for path in self.root.glob("ds-*/dataset.json"):
            try:
                infos.append(_StoredDataset.model_validate_json(path.read_bytes()).info)
            except FileNotFoundError:
                continue
        return sorted(infos, key=lambda info: info.created_at)

    def add_zip(
        self, archive: Path, name: str, limits: ArchiveLimits, *, max_pixels: int
    ) -> DatasetInfo:
        """Extract and validate an uploaded zip; nothing is stored when it is refused."""
        dataset_id = f"ds-{uuid.uuid4().hex}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        staging = self.tmp_dir / dataset_id
        try:
            (staging / "data").mkdir(parents=True)
            extract_zip(archive, staging / "data", limits)
            layout = scan_layout(staging / "data", max_pixels=max_pixels)
            relative_root = layout.root.relative_to(staging)
            info = self._info(dataset_id, name, layout, "upload")
            final = self.root / dataset_id
            self._write(staging, info, final / relative_root)
            self.root.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
        except BaseException:
            remove_tree(staging)
            raise
        return info

    def register(self, folder: Path, name: str, *, max_pixels: int) -> DatasetInfo:
        """Catalogue a folder that already lives on the shared store (it is not copied)."""
        layout = scan_layout(folder, max_pixels=max_pixels)
        dataset_id = f"ds-{uuid.uuid4().hex}"
        info = self._info(dataset_id, name, layout, "registered")
        final = self.root / dataset_id
        final.mkdir(parents=True)
        self._write(final, info, layout.root)
        return info

    def delete(self, dataset_id: str) -> bool:
        """Forget a dataset; an uploaded one's files are removed, a registered folder is not."""
        folder = self._folder(dataset_id)
        if folder is None or not (folder / "dataset.json").exists():
            return False
        # Unlink the record first so the dataset disappears at once, then the files.
        (folder / "dataset.json").unlink(missing_ok=True)
        remove_tree(folder)
        return True

    @staticmethod
    def _info(dataset_id: str, name: str, layout: Layout, source: str) -> DatasetInfo:
        counts = {cls: len(files) for cls, files in layout.images.items()}
        return DatasetInfo(
            id=dataset_id,
            name=name,
            classes=list(counts),
            counts=counts,
            num_images=sum(counts.values()),
            created_at=datetime.now(timezone.utc),
            source=source,
        )

    @staticmethod
    def _write(folder: Path, info: DatasetInfo, root: Path) -> None:
        stored = _StoredDataset(info=info, root=str(root))
        tmp = folder / "dataset.json.tmp"
        tmp.write_text(stored.model_dump_json(indent=2))
        os.replace(tmp, folder / "dataset.json")
