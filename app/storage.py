"""The storage root: checked relative paths, atomic writes and sha256 verification.

The database stores paths relative to ``STORAGE_ROOT``; nothing from a request reaches the
filesystem without :func:`resolve`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
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


def write_atomic(root: Path, relative: str, data: bytes | Iterable[bytes | memoryview]) -> tuple[int, str]:
    """Write ``data`` (bytes, or chunks of them) via a temporary file, fsync, rename; returns (size, sha256).

    The sha256 is counted over the chunks as they are written: large chunks are hashed and written
    with the GIL released, so a writer thread costs the threads beside it little.
    """
    path = resolve(root, relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                size += fh.write(chunk)
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
    return size, digest.hexdigest()


class AtomicWriter:
    """A file written in chunks under the storage root while its size and sha256 are counted.

    It writes to a temporary file in ``directory`` (so the final rename stays on one filesystem);
    :meth:`commit` fsyncs and renames it to its final relative path, :meth:`abort` removes it.
    Werkzeug's form parser may use one as the container of an uploaded file part, so an upload
    goes straight from the socket to storage in chunks, never whole into memory.
    """

    def __init__(self, root: Path, directory: str):
        self.root = Path(root)
        folder = resolve(root, directory)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".upload")
        self.path = Path(tmp)
        self._fh = os.fdopen(fd, "w+b")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> int:
        """Append ``chunk``, counting it into the size and the sha256."""
        self._hash.update(chunk)
        self.size += len(chunk)
        return self._fh.write(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the file position (the form parser rewinds a finished part)."""
        return self._fh.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        """Read from the current position (for a caller that rewinds and reads a little)."""
        return self._fh.read(size)

    def tell(self) -> int:
        """The current position."""
        return self._fh.tell()

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._hash.hexdigest()

    def commit(self, relative: str) -> tuple[int, str]:
        """fsync, rename to ``relative`` (in the same directory tree) and fsync the directory; (size, sha256)."""
        target = resolve(self.root, relative)
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.size, self.sha256

    def abort(self) -> None:
        """Close and remove the temporary file (safe to call after :meth:`commit`)."""
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file handle (the temporary file stays until :meth:`commit` or :meth:`abort`)."""
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


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
