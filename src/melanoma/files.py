"""Writing files so that neither a crash nor a power loss leaves a half-written one.

Every write goes to a temporary file beside the target, which is flushed to the disk
(``fsync``) before it is renamed over the target; then the folder is flushed, so that the
rename itself is on the disk. Without the first flush, a power loss shortly after the
rename can leave the new name pointing at an empty file (the data blocks were still in
the page cache); without the second, at the old file. Readers see the old file or the
new one, never a part of either.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from melanoma.errors import MelanomaError


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot flush a folder (EINVAL); a file's flush must work.
        if not (exc.errno in (errno.EINVAL, errno.ENOTSUP) and Path(path).is_dir()):
            raise
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> Path:
    """Move a finished temporary file or folder into place, durably."""
    tmp, path = Path(tmp), Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``<path>.tmp``, durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return commit(tmp, path)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically and durably."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically and durably (non-JSON values as their ``str``)."""
    return write_text(path, json.dumps(data, indent=2, default=str))


def ensure_folder(folder: Path, what: str) -> Path:
    """Create ``folder`` (and its parents) for output, with a clear error if it cannot be."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MelanomaError(f"The {what} {folder} exists and is not a folder.", hint="Choose another path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MelanomaError(f"Cannot create the {what} {folder}: {exc.strerror or exc}.",
                            hint="Choose a writable path.") from None
    return folder


def check_new_file(path: Path, *, force: bool, what: str = "output file") -> Path:
    """Check, before any work, that ``path`` can be written: its folder exists, and it is
    not a folder nor (unless ``force``) an existing file."""
    path = Path(path)
    if path.is_dir():
        raise MelanomaError(f"The {what} {path} is a folder.", hint="Name a file.")
    if path.exists() and not force:
        raise MelanomaError(f"The {what} {path} already exists.", hint="Pass --force to replace it, or choose another name.")
    folder = path.parent
    if not folder.is_dir():
        raise MelanomaError(f"The folder of the {what} {path} does not exist: {folder}.",
                            hint="Create it first, or choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MelanomaError(f"The folder {folder} cannot be written to (permission denied).",
                            hint="Choose a writable path.")
    return path


def utc_now() -> str:
    """The time now in UTC, to the second, ISO 8601: how every record here is dated."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's content (hex), read in chunks so that memory stays flat."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
