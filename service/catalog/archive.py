"""Safe extraction of an uploaded zip archive.

An archive is untrusted: member names may escape the target folder (``../x``, ``/etc/x``,
``C:\\x``), members may be symbolic links, and a small archive may inflate to terabytes (a zip
bomb, possibly lying about its sizes in the headers). Every member is checked before anything
is written, and the bytes actually inflated are counted while writing.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.exceptions import DatasetError

_CHUNK = 1 << 20

#: Members that archivers add and that are never data (macOS resource forks, Finder files).
_IGNORED_PARTS = frozenset({"__MACOSX", ".DS_Store", "Thumbs.db"})


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on an archive's contents."""

    max_files: int
    max_total_bytes: int


def _error(message: str) -> DatasetError:
    return DatasetError(message, field="file")


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The safe relative path of a member, None for members to skip; refuses unsafe names."""
    name = info.filename
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _error(f"archive member {name!r} has an absolute or non-portable path")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise _error(f"archive member {name!r} points outside the archive ('..')")
    # Unix archivers store st_mode in the high 16 bits; many tools leave the type bits 0.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise _error(f"archive member {name!r} is a symbolic link; links are not accepted")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _error(f"archive member {name!r} is not a regular file")
    if info.is_dir() or any(p in _IGNORED_PARTS or p.startswith("._") for p in path.parts):
        return None
    return path


def extract_zip(archive: Path, target: Path, limits: ArchiveLimits) -> int:
    """Extract the regular files of ``archive`` into the empty folder ``target``.

    Returns the number of files written. :class:`DatasetError` (field ``file``) for a file that
    is not a zip archive, an unsafe member, more than ``limits.max_files`` files or more than
    ``limits.max_total_bytes`` inflated bytes; ``target`` is left for the caller to remove.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [(info, _member_path(info)) for info in zf.infolist()]
            files = [(info, path) for info, path in members if path is not None]
            if len(files) > limits.max_files:
                raise _error(
                    f"the archive holds {len(files)} files, over the limit of {limits.max_files}"
                )
            declared = sum(info.file_size for info, _ in files)
            if declared > limits.max_total_bytes:
                raise _error(
                    f"the archive inflates to {declared:,} bytes, over the limit of "
                    f"{limits.max_total_bytes:,}"
                )
            budget = limits.max_total_bytes
            for info, path in files:
                budget -= _extract_member(zf, info, target / path, budget)
    except zipfile.BadZipFile as exc:
        raise _error(f"not a valid zip archive: {exc}") from exc
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        # Unsupported compression, encrypted members, ZIP64 where disabled.
        raise _error(f"cannot extract the archive: {exc}") from exc
    return len(files)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: int) -> int:
    """Write one member, counting real inflated bytes against ``budget`` (headers may lie)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise _error(f"archive member {info.filename!r} appears twice")
    written = 0
    with zf.open(info) as src, dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > budget:
                raise _error("the archive inflates to more bytes than the limit (zip bomb?)")
            out.write(chunk)
    return written


def remove_tree(path: Path) -> None:
    """Remove a folder tree, ignoring a folder that is already gone."""
    shutil.rmtree(path, ignore_errors=True)
