"""The dataset catalog: labelled image folders on the shared data volume.

A dataset is a folder in one of the layouts of :mod:`core.layout` (``<class>/<image>``, possibly
wrapped in a top folder, or UC Merced's ``Images/<class>/*.tif``): the gateway validates it with
the very code the workers read it with. Uploaded zips are extracted under ``datasets/<id>/data``;
registered folders stay where they are. ``datasets/<id>/dataset.json`` holds the
:class:`DatasetInfo` (with its owner) and the resolved class root that workers hand to
``core.datasets``. Torch-free: images are checked from their headers with PIL.
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
from core.layout import ImageFolder
from service.auth import Principal
from service.catalog.archive import ArchiveLimits, extract_zip, remove_tree

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
    owner: str | None = Field(default=None, description="Who stored it; null: unowned.")


class _StoredDataset(BaseModel):
    """The catalog's file: the public info plus where the class folders are."""

    info: DatasetInfo
    root: str


def scan_layout(folder: Path, *, max_pixels: int, shown_as: str | None = None) -> ImageFolder:
    """Validate a dataset folder: a layout :mod:`core.layout` reads, at least two classes, none
    empty, every image readable (header) and within ``max_pixels``. :class:`DatasetError`
    (field ``file``) otherwise; with ``shown_as``, messages name ``folder`` that way instead of
    by its path (an upload's staging folder is nobody's business)."""
    try:
        layout = ImageFolder.from_path(folder)
        for sample in layout.samples:
            _check_image(sample.path, layout.root, max_pixels)
    except DatasetError as exc:
        message = exc.message
        if shown_as is not None:  # paths inside the folder become relative ones
            message = message.replace(f"{folder}/", "").replace(f"'{folder}'", shown_as)
        raise DatasetError(message, field="file") from exc
    return layout


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

    def get(self, dataset_id: str, owner: str | None = None) -> DatasetInfo | None:
        """A dataset of ``owner``; None when unknown or someone else's."""
        stored = self._load(dataset_id)
        return None if stored is None or stored.info.owner != owner else stored.info

    def find(self, dataset_id: str, principal: Principal) -> DatasetInfo | None:
        """A dataset ``principal`` may see."""
        stored = self._load(dataset_id)
        return stored.info if stored is not None and principal.can_see(stored.info.owner) else None

    def images_root(self, dataset_id: str, owner: str | None = None) -> Path | None:
        """The folder holding the class folders of ``owner``'s dataset (what
        ``core.datasets`` reads)."""
        stored = self._load(dataset_id)
        return None if stored is None or stored.info.owner != owner else Path(stored.root)

    def list_for(self, principal: Principal) -> list[DatasetInfo]:
        """The datasets ``principal`` may see, oldest first."""
        infos = []
        for path in self.root.glob("ds-*/dataset.json"):
            try:
                info = _StoredDataset.model_validate_json(path.read_bytes()).info
            except FileNotFoundError:
                continue
            if principal.can_see(info.owner):
                infos.append(info)
        return sorted(infos, key=lambda info: info.created_at)

    def add_zip(
        self,
        archive: Path,
        name: str,
        limits: ArchiveLimits,
        *,
        max_pixels: int,
        owner: str | None = None,
    ) -> DatasetInfo:
        """Extract and validate an uploaded zip; nothing is stored when it is refused."""
        dataset_id = f"ds-{uuid.uuid4().hex}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        staging = self.tmp_dir / dataset_id
        try:
            (staging / "data").mkdir(parents=True)
            extract_zip(archive, staging / "data", limits)
            layout = scan_layout(staging / "data", max_pixels=max_pixels, shown_as="the archive")
            relative_root = layout.root.relative_to(staging)
            info = self._info(dataset_id, name, layout, "upload", owner)
            final = self.root / dataset_id
            self._write(staging, info, final / relative_root)
            self.root.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
        except BaseException:
            remove_tree(staging)
            raise
        return info

    def register(
        self, folder: Path, name: str, *, max_pixels: int, owner: str | None = None
    ) -> DatasetInfo:
        """Catalogue a folder that already lives on the shared store (it is not copied)."""
        layout = scan_layout(folder, max_pixels=max_pixels)
        dataset_id = f"ds-{uuid.uuid4().hex}"
        info = self._info(dataset_id, name, layout, "registered", owner)
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
    def _info(
        dataset_id: str, name: str, layout: ImageFolder, source: str, owner: str | None
    ) -> DatasetInfo:
        counts = layout.class_counts()
        return DatasetInfo(
            id=dataset_id,
            name=name,
            classes=list(counts),
            counts=counts,
            num_images=sum(counts.values()),
            created_at=datetime.now(timezone.utc),
            source=source,
            owner=owner,
        )

    @staticmethod
    def _write(folder: Path, info: DatasetInfo, root: Path) -> None:
        stored = _StoredDataset(info=info, root=str(root))
        tmp = folder / "dataset.json.tmp"
        tmp.write_text(stored.model_dump_json(indent=2))
        os.replace(tmp, folder / "dataset.json")
