"""Helpers for multipart uploads: spooling a part to disk and naming it safely."""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePath

from fastapi import UploadFile

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1 << 20


def save_upload(upload: UploadFile, dest: Path) -> int:
    """Copy an uploaded part to ``dest``; returns its size in bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    upload.file.seek(0)
    with dest.open("wb") as out:
        shutil.copyfileobj(upload.file, out, _CHUNK)
    return dest.stat().st_size


def client_name(upload: UploadFile, default: str) -> str:
    """The client's file name without any directory part (what results call the image)."""
    name = PurePath((upload.filename or "").replace("\\", "/")).name.strip()
    return name or default


def safe_filename(name: str, default: str = "file") -> str:
    """``name`` reduced to a portable file name (letters, digits, ``._-``), never hidden."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or default
    return cleaned[:100]
