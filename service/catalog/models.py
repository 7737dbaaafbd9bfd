"""The model catalog: checkpoints on the shared data volume, addressed by content digest.

``models/<hex>.safetensors`` holds the checkpoint and ``models/<hex>.json`` its
:class:`ModelInfo`. Files are written under another name and renamed into place, so a reader
never sees half a file, and an upload that fails validation never touches stored models. The
gateway adds uploads; workers add the checkpoints their jobs produce. Torch-free: checkpoints
are read with :func:`core.checkpoint_meta.read_meta`, which parses the header only.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.checkpoint_meta import CheckpointMeta, LineageStep, file_digest, read_meta
from core.damage_spec import DamageSpec
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD

_DIGEST_ID = re.compile(r"^sha256:([0-9a-f]{64})$")

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

    @classmethod
    def from_meta(cls, model_id: str, meta: CheckpointMeta, size_bytes: int) -> ModelInfo:
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
    """Stored checkpoints plus the built-in ImageNet models named in the settings."""

    def __init__(self, root: Path, tmp_dir: Path, builtins: list[str] | tuple[str, ...] = ()):
        self.root = root
        self.tmp_dir = tmp_dir
        self.builtins = {name: ModelInfo.builtin_imagenet(name) for name in builtins}

    # --- paths ---------------------------------------------------------------------------------
    def _hex(self, model_id: str) -> str | None:
        match = _DIGEST_ID.match(model_id)
        return match.group(1) if match else None

    def checkpoint_path(self, model_id: str) -> Path | None:
        """The stored file of an uploaded model; None for unknown and built-in ids."""
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return None
        path = self.root / f"{hex_digest}.safetensors"
        return path if path.is_file() else None

    def _info_path(self, hex_digest: str) -> Path:
        return self.root / f"{hex_digest}.json"

    # --- reading -------------------------------------------------------------------------------
    def get(self, model_id: str) -> ModelInfo | None:
        """A model by id (built-in or stored); None when unknown."""
        if model_id in self.builtins:
            return self.builtins[model_id]
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return None
        try:
            return ModelInfo.model_validate_json(self._info_path(hex_digest).read_bytes())
        except FileNotFoundError:
            return None

    def list(self) -> list[ModelInfo]:
        """Built-ins first, then stored models, oldest first."""
        stored = []
        for info_path in self.root.glob("*.json"):
            try:
                stored.append(ModelInfo.model_validate_json(info_path.read_bytes()))
            except FileNotFoundError:  # deleted while listing
                continue
        stored.sort(key=lambda m: m.created_at or datetime.min.replace(tzinfo=timezone.utc))
        return [*self.builtins.values(), *stored]

    # --- writing -------------------------------------------------------------------------------
    def add(self, path: Path) -> tuple[ModelInfo, bool]:
        """Validate the checkpoint at ``path`` and move it into the catalog.

        ``path`` must be on the catalog's filesystem (e.g. under the settings' tmp dir); it is
        consumed. Returns the model and whether it is new — adding a file whose digest is
        already stored keeps the stored copy. :class:`core.exceptions.CheckpointError` for a
        file that is not a camres checkpoint (``path`` is removed then too).
        """
        try:
            meta = read_meta(path)
            model_id = file_digest(path)
            size = path.stat().st_size
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        hex_digest = model_id.removeprefix("sha256:")
        existing = self.get(model_id)
        if existing is not None and self.checkpoint_path(model_id) is not None:
            path.unlink(missing_ok=True)
            return existing, False
        info = ModelInfo.from_meta(model_id, meta, size)
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(path, self.root / f"{hex_digest}.safetensors")
        self._write_info(hex_digest, info)
        return info, True

    def _write_info(self, hex_digest: str, info: ModelInfo) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{hex_digest}.{os.getpid()}.json"
        tmp.write_text(info.model_dump_json(indent=2))
        # The info file is written last: a model is listed only once its checkpoint is in place.
        os.replace(tmp, self._info_path(hex_digest))

    def delete(self, model_id: str) -> bool:
        """Remove a stored model; False when unknown (built-ins cannot be deleted)."""
        hex_digest = self._hex(model_id)
        if hex_digest is None:
            return False
        info_path = self._info_path(hex_digest)
        if not info_path.exists():
            return False
        info_path.unlink(missing_ok=True)
        (self.root / f"{hex_digest}.safetensors").unlink(missing_ok=True)
        return True

    def new_tmp_path(self, suffix: str = ".safetensors") -> Path:
        """A fresh scratch file name next to the catalog (same filesystem, for renames)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"model-{os.getpid()}-{os.urandom(8).hex()}{suffix}"
