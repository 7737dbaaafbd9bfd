"""The model catalog: checkpoints on the shared data volume, addressed by content digest.

``models/[owners/<owner>/]<hex>.safetensors`` holds the checkpoint and ``<hex>.json`` next to it
its :class:`ModelInfo`. Files are written under another name and renamed into place, so a reader
never sees half a file, and an upload that fails validation never touches stored models. The
gateway adds uploads; workers add the checkpoints their jobs produce. Torch-free: checkpoints
are read with :func:`core.checkpoint_meta.read_meta`, which parses the header only, and their
tensors are checked against the metadata by :mod:`service.catalog.weights`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.checkpoint_meta import (
    CheckpointMeta,
    LineageStep,
    SafetensorsHeader,
    file_digest,
    read_header,
    read_meta,
)
from core.damage_spec import DamageSpec
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from service.auth import Principal
from service.catalog.weights import check_tensors
from service.settings import OWNER_NAME

_DIGEST_ID = re.compile(r"^sha256:([0-9a-f]{64})$")
#: Folder of the per-owner model folders, under the catalog root.
OWNERS_DIR = "owners"

#: torchvision's default ImageNet evaluation size.
IMAGENET_INPUT_SIZE = 224
IMAGENET_NUM_CLASSES = 1000


class ModelInfo(BaseModel):
    """What the API tells about a model: where it comes from and how it expects its inputs."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description='"sha256:<hex>" of the checkpoint file, or "<arch>:imagenet".')
    arch: str
    classes: list[str] | None = Field(description="None for built-in ImageNet models.")
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lineage: list[LineageStep] = Field(default_factory=list)
    damage: DamageSpec | None = None
    has_damage_masks: bool = False
    builtin: bool = False
    created_at: datetime | None = None
    size_bytes: int | None = None
    owner: str | None = Field(
        default=None, description="Who stored it; null for built-ins and unowned models."
    )

    @classmethod
    def from_meta(
        cls, model_id: str, meta: CheckpointMeta, size_bytes: int, owner: str | None = None
    ) -> ModelInfo:
        pre = meta.preprocessing
        return cls(
            id=model_id,
            arch=meta.arch,
            classes=list(meta.classes),
            num_classes=len(meta.classes),
            input_size=pre.input_size,
            mean=pre.mean,
            std=pre.std,
            lineage=list(meta.lineage),
            damage=meta.damage,
            has_damage_masks=meta.has_damage_masks,
            created_at=datetime.now(timezone.utc),
            size_bytes=size_bytes,
            owner=owner,
        )

    @classmethod
    def builtin_imagenet(cls, model_id: str) -> ModelInfo:
        arch = model_id.partition(":")[0]
        return cls(
            id=model_id,
            arch=arch,
            classes=None,
            num_classes=IMAGENET_NUM_CLASSES,
            input_size=IMAGENET_INPUT_SIZE,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            builtin=True,
        )


class ModelCatalog:
    """Stored checkpoints plus the built-in ImageNet models named in the settings.

    Each owner has a folder of their own (``owners/<owner>/``; unowned models, stored while
    access control is off, sit in the root), so two owners may upload the same bytes — the
    same id — without seeing or deleting each other's copy.
    """

    def __init__(self, root: Path, tmp_dir: Path, builtins: list[str] | tuple[str, ...] = ()):
        self.root = root
        self.tmp_dir = tmp_dir
        self.builtins = {name: ModelInfo.builtin_imagenet(name) for name in builtins}

    # --- paths ---------------------------------------------------------------------------------
    def _hex(self, model_id: str) -> str | None:
        match = _DIGEST_ID.match(model_id)
        return match.group(1) if match else None

    def _dir(self, owner: str | None) -> Path:
        if owner is None:
            return self.root
        if not OWNER_NAME.match(owner):  # it names a folder: never trust it blindly
            raise ValueError(f"invalid owner name {owner!r}")
        return self.root / OWNERS_DIR / owner

    def _owners(self) -> list[str | None]:
        folder = self.root / OWNERS_DIR
        named = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return [None, *(name for name in named if OWNER_NAME.match(name))]

    def checkpoint_path(self, model_id: str, owner: str | None = None) -> Path | None:
        """The stored file of an uploaded model of ``owner``; None for unknown and built-in
        ids."""
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return None
        path = self._dir(owner) / f"{hex_digest}.safetensors"
        return path if path.is_file() else None

    def header(self, model_id: str, owner: str | None = None) -> SafetensorsHeader | None:
        """The safetensors header of a stored model (None for built-ins and unknown ids)."""
        path = self.checkpoint_path(model_id, owner)
        return None if path is None else read_header(path)

    # --- reading -------------------------------------------------------------------------------
    def get(self, model_id: str, owner: str | None = None) -> ModelInfo | None:
        """A built-in model, or a stored model of ``owner``; None when unknown."""
        if model_id in self.builtins:
            return self.builtins[model_id]
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return None
        try:
            return ModelInfo.model_validate_json(
                (self._dir(owner) / f"{hex_digest}.json").read_bytes()
            )
        except FileNotFoundError:
            return None

    def find(self, model_id: str, principal: Principal) -> ModelInfo | None:
        """A model ``principal`` may see: a built-in, its owner's, or (admin) anyone's."""
        owners = self._owners() if principal.admin else [principal.owner]
        if principal.owner in owners:  # the principal's own copy first
            owners.remove(principal.owner)
            owners.insert(0, principal.owner)
        for owner in owners:
            info = self.get(model_id, owner)
            if info is not None:
                return info
        return None

    def list_for(self, principal: Principal) -> list[ModelInfo]:
        """What ``principal`` may see: built-ins first, then stored models (an admin: everyone's),
        oldest first."""
        owners = self._owners() if principal.admin else [principal.owner]
        stored = [info for owner in owners for info in self._stored(owner)]
        stored.sort(key=lambda m: m.created_at or datetime.min.replace(tzinfo=timezone.utc))
        return [*self.builtins.values(), *stored]

    def _stored(self, owner: str | None) -> list[ModelInfo]:
        stored = []
        for info_path in self._dir(owner).glob("*.json"):
            try:
                stored.append(ModelInfo.model_validate_json(info_path.read_bytes()))
            except FileNotFoundError:  # deleted while listing
                continue
        stored.sort(key=lambda m: m.created_at or datetime.min.replace(tzinfo=timezone.utc))
        return stored

    # --- writing -------------------------------------------------------------------------------
    def add(self, path: Path, owner: str | None = None) -> tuple[ModelInfo, bool]:
        """Validate the checkpoint at ``path`` and move it into ``owner``'s models.

        ``path`` must be on the catalog's filesystem (e.g. under the settings' tmp dir); it is
        consumed. Returns the model and whether it is new — adding a file whose digest the
        owner already has keeps the stored copy. :class:`core.exceptions.CheckpointError` for a
        file that is not a camres checkpoint or whose tensors contradict its metadata (``path``
        is removed then too).
        """
        try:
            header = read_header(path)
            meta = read_meta(path)
            check_tensors(meta, header)
            model_id = file_digest(path)
            size = path.stat().st_size
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        hex_digest = model_id.removeprefix("sha256:")
        existing = self.get(model_id, owner)
        if existing is not None and self.checkpoint_path(model_id, owner) is not None:
            path.unlink(missing_ok=True)
            return existing, False
        info = ModelInfo.from_meta(model_id, meta, size, owner)
        folder = self._dir(owner)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, folder / f"{hex_digest}.safetensors")
        self._write_info(folder / f"{hex_digest}.json", info)
        return info, True

    def _write_info(self, dest: Path, info: ModelInfo) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{dest.stem}.{os.getpid()}.{os.urandom(4).hex()}.json"
        tmp.write_text(info.model_dump_json(indent=2))
        # The info file is written last: a model is listed only once its checkpoint is in place.
        os.replace(tmp, dest)

    def delete(self, model_id: str, owner: str | None = None) -> bool:
        """Remove a stored model of ``owner``; False when unknown (built-ins cannot be
        deleted)."""
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return False
        folder = self._dir(owner)
        info_path = folder / f"{hex_digest}.json"
        if not info_path.exists():
            return False
        info_path.unlink(missing_ok=True)
        (folder / f"{hex_digest}.safetensors").unlink(missing_ok=True)
        return True

    def new_tmp_path(self, suffix: str = ".safetensors") -> Path:
        """A fresh scratch file name next to the catalog (same filesystem, for renames)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"model-{os.getpid()}-{os.urandom(8).hex()}{suffix}"
