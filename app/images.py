"""The image rules both sides apply: what a zip of class folders may hold, and what an image input is.

The web's upload and submit checks and the worker's loaders call these same functions, so an
archive or an input that passes at upload or submit is read the same way when the job runs.
Torch-free: Pillow reads headers (and, for the worker, pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import posixpath
import zipfile
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
# An archive may unpack to at most this many bytes in all, and one image to at most MAX_IMAGE_BYTES;
# a member that claims to unpack to more than MAX_COMPRESSION_RATIO times its stored size is a bomb.
MAX_ARCHIVE_BYTES = 1024 * 2**20
MAX_IMAGE_BYTES = 16 * 2**20
MAX_COMPRESSION_RATIO = 200
MAX_IMAGES = 200_000
# Bigger pictures than this are refused before their pixels are decoded (Pillow's own guard is 89M).
MAX_PIXELS = 4096 * 4096
# A prediction input is at most this many bytes once base64 is decoded.
MAX_INPUT_BYTES = 4 * 2**20
# How many images the web opens to report sizes at upload.
SAMPLED_IMAGES = 5


class ImageError(ValueError):
    """An archive or an image that cannot be used; the message says why and names the member."""


@dataclass(frozen=True)
class Member:
    """One image of an archive: its path inside the zip and the class folder it sits in."""

    name: str
    label: str


def list_members(archive: zipfile.ZipFile) -> list[Member]:
    """The images of a zip of class folders (``cats/001.png``), checked for traversal and bombs.

    The class is an image's parent folder; one folder holding every class folder is allowed.
    Directories, ``__MACOSX/`` and hidden files are skipped; any other file is refused.
    """
    members: list[Member] = []
    total = 0
    for info in archive.infolist():
        name = info.filename
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
            raise ImageError(f"zip member {name!r} has an unsafe path (absolute or with '..')")
        if posixpath.normpath(name) != name.rstrip("/"):
            raise ImageError(f"zip member {name!r} has an unsafe path")
        if info.is_dir() or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue
        total += info.file_size
        if info.file_size > MAX_IMAGE_BYTES:
            raise ImageError(f"zip member {name!r} unpacks to {info.file_size} bytes; an image may have {MAX_IMAGE_BYTES}")
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
            raise ImageError(f"zip member {name!r} is compressed {info.file_size // info.compress_size}:1; "
                             "that is a zip bomb, not an image")
        if total > MAX_ARCHIVE_BYTES:
            raise ImageError(f"the zip unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            raise ImageError(f"zip member {name!r} is not a .png, .jpg or .jpeg image")
        if len(parts) < 2:
            raise ImageError(f"zip member {name!r} is not in a class folder (put it in e.g. cats/{name})")
        members.append(Member(name, parts[-2]))
        if len(members) > MAX_IMAGES:
            raise ImageError(f"the zip holds more than {MAX_IMAGES} images")
    if not members:
        raise ImageError("the zip holds no .png or .jpg images in class folders")
    roots = {m.name.split("/")[0] for m in members}
    depths = {m.name.count("/") for m in members}
    if len(depths) > 1 or (depths == {2} and len(roots) > 1) or depths - {1, 2}:
        raise ImageError("put every image one level inside a class folder (cats/001.png), "
                         "optionally all under one top folder")
    return members


def read_member(archive: zipfile.ZipFile, member: Member) -> bytes:
    """A member's bytes, read with a cap so a header that lies about the size cannot flood memory."""
    with archive.open(member.name) as stream:
        data = stream.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"zip member {member.name!r} unpacks to more than {MAX_IMAGE_BYTES} bytes")
    return data


def open_image(data: bytes, what: str):
    """A Pillow image of encoded PNG or JPEG bytes (header read, size checked, pixels not yet decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{what} is not a PNG or JPEG image") from None
    if image.format not in ("PNG", "JPEG"):
        raise ImageError(f"{what} is a {image.format} image; use PNG or JPEG")
    width, height = image.size
    if width * height > MAX_PIXELS or width < 1 or height < 1:
        raise ImageError(f"{what} is {width}x{height} pixels; at most {MAX_PIXELS} pixels are allowed")
    return image


def decode_rgb(data: bytes, what: str, mode: str = "RGB"):
    """Decoded pixels of an image in ``mode`` ("RGB" or "L"), or an ImageError naming ``what``."""
    image = open_image(data, what)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise ImageError(f"{what} is a damaged image") from None
    return image.convert(mode)


def decode_input(text: str, what: str) -> bytes:
    """The bytes of a base64 image input (a ``data:image/...;base64,`` prefix is allowed), checked."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > MAX_INPUT_BYTES * 4 // 3 + 8:
        raise ImageError(f"{what} is larger than {MAX_INPUT_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what} is not base64 (send PNG or JPEG bytes, base64-encoded)") from None
    open_image(data, what)
    return data


def describe_archive(data: bytes | str | os.PathLike) -> dict:
    """The stored schema of an uploaded zip (its bytes, or its path: only the central directory and
    sampled members are read): image and label columns, rows, images per class, sampled sizes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except zipfile.BadZipFile:
        raise ImageError("the file is not a zip archive") from None
    with archive:
        members = list_members(archive)
        sizes = []
        step = max(1, len(members) // SAMPLED_IMAGES)
        for member in members[::step][:SAMPLED_IMAGES]:
            image = open_image(read_member(archive, member), f"zip member {member.name!r}")
            sizes.append(list(image.size))
    counts: dict[str, int] = {}
    for member in members:
        counts[member.label] = counts.get(member.label, 0) + 1
    return {
        "kind": "images",
        "rows": len(members),
        "classes": dict(sorted(counts.items())),
        "image_sizes": sizes,
        "columns": [
            {"name": IMAGE_COLUMN, "dtype": "image", "numeric": False, "image": True, "distinct": len(members),
             "missing": 0, "samples": [m.name for m in members[:3]]},
            {"name": LABEL_COLUMN, "dtype": "object", "numeric": False, "distinct": len(counts), "missing": 0,
             "samples": sorted(counts)[:5]},
        ],
    }
