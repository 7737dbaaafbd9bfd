"""Checkpoint metadata and a pure-Python reader of the safetensors header. Torch-free: the gateway
inspects uploaded checkpoints with it without importing torch, and without ever unpickling.

A camres checkpoint is a safetensors file (https://github.com/huggingface/safetensors): an
8-byte little-endian header length ``N``, ``N`` bytes of JSON describing every tensor (dtype,
shape, byte range), then the raw tensor bytes. The JSON's ``__metadata__`` object maps strings to
strings; :class:`CheckpointMeta` is stored JSON-encoded under the key :data:`META_KEY`. Damage
masks are extra boolean tensors named :data:`MASK_PREFIX` + parameter name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.damage_spec import DamageSpec
from core.exceptions import CheckpointError
from core.preprocessing import Preprocessing

__all__ = [
    "FORMAT_VERSION",
    "MASK_PREFIX",
    "META_KEY",
    "CheckpointMeta",
    "LineageStep",
    "SafetensorsHeader",
    "TensorInfo",
    "bytes_digest",
    "file_digest",
    "read_header",
    "read_meta",
]

FORMAT_VERSION = 1
#: Key of the JSON-encoded :class:`CheckpointMeta` in the safetensors ``__metadata__``.
META_KEY = "camres"
#: Tensor-name prefix of damage masks (never a valid ``state_dict`` key: it starts with "__").
MASK_PREFIX = "__damage_mask__."
#: Upper bound on the JSON header; ResNet152 with masks needs well under 1 MiB.
MAX_HEADER_BYTES = 16 * 1024 * 1024

#: safetensors dtype → bytes per element (sub-byte and exotic dtypes are refused).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


class LineageStep(BaseModel):
    """One step in a model's history: what was done (``op``: "train", "damage", "retrain",
    "import", ...), to which checkpoint (``parent_digest``, ``None`` for a root) and how
    (``params``: e.g. the DamageSpec or the training configuration)."""

    model_config = ConfigDict(extra="forbid")

    op: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    parent_digest: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parent_digest")
    @classmethod
    def _digest_format(cls, value: str | None) -> str | None:
        if value is not None and not _DIGEST.match(value):
            raise ValueError("parent_digest must look like 'sha256:<64 hex digits>'")
        return value


class CheckpointMeta(BaseModel):
    """Everything needed to rebuild and use a model besides its tensors."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    arch: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    classes: list[str] = Field(min_length=1, max_length=100_000)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    provenance: dict[str, Any] = Field(default_factory=dict)
    lineage: list[LineageStep] = Field(default_factory=list)
    damage: DamageSpec | None = None
    has_damage_masks: bool = False

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if not 1 <= value <= FORMAT_VERSION:
            raise ValueError(
                f"format_version {value} is not supported (this camres reads 1–{FORMAT_VERSION})"
            )
        return value

    @field_validator("classes")
    @classmethod
    def _clean_classes(cls, value: list[str]) -> list[str]:
        if any(not name or name != name.strip() for name in value):
            raise ValueError("class names must be non-blank, without surrounding spaces")
        if len(set(value)) != len(value):
            raise ValueError("class names must be unique")
        return value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_size: int  # N: bytes of JSON after the 8-byte length prefix

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size


def read_meta(source: bytes | str | Path) -> CheckpointMeta:
    """The :class:`CheckpointMeta` of a camres checkpoint (a path or its bytes), validated.

    Reads only the header; :class:`CheckpointError` for anything else — a pickle or a
    ``torch.save()`` zip, random bytes, a truncated file, a plain safetensors file without
    camres metadata, or metadata that disagrees with the tensors (damage masks).
    """
    header = read_header(source)
    raw = header.metadata.get(META_KEY)
    if raw is None:
        raise CheckpointError(
            "a safetensors file without camres metadata (no "
            f"{META_KEY!r} key in __metadata__); it is not a camres checkpoint",
            field="checkpoint",
        )
    try:
        meta = CheckpointMeta.model_validate_json(raw)
    except ValidationError as exc:
        raise CheckpointError(
            f"invalid camres metadata: {_summarise(exc)}", field="checkpoint"
        ) from exc
    _check_masks(meta, header)
    return meta


def read_header(source: bytes | str | Path) -> SafetensorsHeader:
    """Parse and validate the safetensors header of ``source`` (bytes or a path)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _parse(data[:8], lambda n: data[8 : 8 + n], len(data))
    path = Path(source)
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            return _parse(fh.read(8), fh.read, size)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {exc}", field="checkpoint"
        ) from exc


def _parse(prefix: bytes, read: Callable[[int], bytes], total: int) -> SafetensorsHeader:
    foreign = _sniff(prefix)
    if foreign:
        raise CheckpointError(
            f"looks like {foreign}; only safetensors checkpoints are accepted "
            "(camres never unpickles: a pickle can run arbitrary code when loaded)",
            field="checkpoint",
        )
    if total < 8:
        raise CheckpointError(
            f"not a safetensors file: {total} bytes, shorter than the 8-byte header length",
            field="checkpoint",
        )
    size = int.from_bytes(prefix[:8], "little")
    if size < 2 or size > MAX_HEADER_BYTES or size > total - 8:
        raise CheckpointError(
            f"not a safetensors file (or truncated): header length {size} does not fit a "
            f"{total}-byte file (limit {MAX_HEADER_BYTES} bytes)",
            field="checkpoint",
        )
    raw = read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    # RecursionError: a deeply nested JSON document, a cheap way to crash a naive parser.
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"not a safetensors file: its header is not JSON ({exc})", field="checkpoint"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            "not a safetensors file: its header is not a JSON object", field="checkpoint"
        )
    metadata = _metadata(header.pop("__metadata__", {}))
    tensors = {name: _tensor_info(name, entry) for name, entry in header.items()}
    _check_layout(tensors, total - 8 - size)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_size=size)


def _sniff(prefix: bytes) -> str | None:
    """Name the kind of a file that is certainly not safetensors, from its first bytes."""
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"PK\x05\x06"):
        return "a zip archive, e.g. a pickle-based PyTorch file written by torch.save()"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a pickle-based PyTorch file (a Python pickle)"
    if prefix.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if prefix.startswith(b"\x89HDF"):
        return "an HDF5 file (e.g. Keras weights)"
    if prefix.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    return None


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(
            "invalid safetensors header: __metadata__ must map strings to strings",
            field="checkpoint",
        )
    return value


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(
            f"invalid safetensors header: tensor {name!r} {reason}", field="checkpoint"
        )

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise bad(f"has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise bad(f"spans {end - begin} bytes, not what {dtype}{shape} needs")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Byte ranges must tile the data section exactly, as the safetensors spec requires."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            raise CheckpointError(
                f"invalid safetensors file: tensor {name!r} starts at byte {info.begin}, "
                f"expected {position} (overlapping or gapped data)",
                field="checkpoint",
            )
        position = info.end
    if position != data_size:
        raise CheckpointError(
            f"invalid or truncated safetensors file: tensors need {position} data bytes, "
            f"the file has {data_size}",
            field="checkpoint",
        )


def _check_masks(meta: CheckpointMeta, header: SafetensorsHeader) -> None:
    masks = {k: v for k, v in header.tensors.items() if k.startswith(MASK_PREFIX)}
    if bool(masks) != meta.has_damage_masks:
        state = "has" if masks else "has no"
        raise CheckpointError(
            f"inconsistent checkpoint: it {state} damage masks but has_damage_masks is "
            f"{meta.has_damage_masks}",
            field="checkpoint",
        )
    for key, info in masks.items():
        target = header.tensors.get(key[len(MASK_PREFIX) :])
        if info.dtype not in ("BOOL", "U8"):
            raise CheckpointError(f"damage mask {key!r} has dtype {info.dtype}", field="checkpoint")
        if target is None or target.shape != info.shape:
            raise CheckpointError(
                f"damage mask {key!r} matches no tensor of the same shape", field="checkpoint"
            )


def _summarise(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'meta'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts[:5]) + ("; ..." if len(parts) > 5 else "")


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def bytes_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``; equal to :func:`file_digest` of a file holding it."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
