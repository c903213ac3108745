"""The storage root: checked relative paths, atomic writes and sha256 verification.

The database stores paths relative to ``STORAGE_ROOT``; nothing from a request reaches the
filesystem without :func:`resolve`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path


class StorageError(Exception):
    """A path outside the storage root, or a file whose checksum does not match."""


# Kiln names every stored file itself (ids, hex, fixed words), so a segment is a plain ASCII
# name: this refuses "..", ".", empty segments, backslashes, NUL, percent signs and any
# non-ASCII look-alike before the filesystem sees the path, whatever the platform would make of it.
_SEGMENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}")


def resolve(root: Path, relative: str) -> Path:
    """The absolute path of ``relative`` under ``root``; refuses anything that escapes it."""
    if (not isinstance(relative, str) or not relative or len(relative) > 1024
            or not all(_SEGMENT.fullmatch(part) for part in relative.split("/"))):
        raise StorageError(f"not a relative storage path: {relative!r}")
    root = Path(root).resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name the filesystem refuses
        raise StorageError(f"cannot resolve storage path {relative!r}: {exc}") from None
    # Symlinks are followed above, so a link inside the root that points out of it is caught here.
    if root not in path.parents:
        raise StorageError(f"path escapes the storage root: {relative!r}")
    return path


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_atomic(root: Path, relative: str, data: bytes) -> tuple[int, str]:
    """Write ``data`` via a temporary file, fsync, rename; returns (size, sha256)."""
    path = resolve(root, relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(data), sha256_bytes(data)


def read_verified(root: Path, relative: str, sha256: str) -> bytes:
    """Read a file and check its sha256 before anyone parses it."""
    data = resolve(root, relative).read_bytes()
    actual = sha256_bytes(data)
    if actual != sha256:
        raise StorageError(f"{relative}: sha256 {actual[:12]}… does not match the recorded {sha256[:12]}…")
    return data


def delete(root: Path, relative: str) -> None:
    """Remove a file if it exists."""
    resolve(root, relative).unlink(missing_ok=True)
