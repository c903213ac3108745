"""The storage root: ``resolve`` keeps every path, however spelled, inside the root."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app import storage

ESCAPES = [
    "../secret", "a/../../secret", "jobs/1/../../../secret", "..", ".", "./x", "a//b", "a/", "/etc/passwd",
    "//etc/passwd", "\\etc\\passwd", "..\\..\\secret", "a\\..\\..\\secret", "a\x00b", "jobs/\x00/x",
    "%2e%2e/secret", "%2e%2e%2fsecret", "..%2fsecret", "..%c0%afsecret", "\xc0\xae\xc0\xae/secret",
    "\uff0e\uff0e/secret", "\u2024\u2024/secret", "jobs/\u202e/x", "caf\u00e9", "\ud800", "a/\udcff",
    "C:\\Windows", "~/secret", "x" * 2000, "",
]


@pytest.mark.parametrize("relative", ESCAPES)
def test_resolve_refuses_paths_that_are_not_plain_names_under_the_root(tmp_path, relative):
    with pytest.raises(storage.StorageError):
        storage.resolve(tmp_path / "root", relative)


def test_resolve_accepts_the_paths_kiln_writes(tmp_path):
    root = tmp_path / "root"
    for relative in ("jobs/12/checkpoints/a1-e00003-s000000042.safetensors", "datasets/3/0f3a9c.csv"):
        assert storage.resolve(root, relative) == root.resolve() / relative


def test_resolve_refuses_symlinks_that_lead_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "jobs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    (root / "jobs" / "out").symlink_to(outside)
    (root / "jobs" / "file").symlink_to(outside / "secret")
    (root / "jobs" / "loop").symlink_to(root / "jobs" / "loop")
    (root / "jobs" / "top").symlink_to(root)
    for relative in ("jobs/out/secret", "jobs/file", "jobs/loop", "jobs/top"):
        with pytest.raises(storage.StorageError):
            storage.resolve(root, relative)
    with pytest.raises(storage.StorageError):
        storage.read_verified(root, "jobs/out/secret", storage.sha256_bytes(b"not yours"))
    with pytest.raises(storage.StorageError):
        storage.write_atomic(root, "jobs/out/planted", b"x")
    assert not (outside / "planted").exists()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relative=st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["..", ".", "", "a", "%2e", "\\", "\x00", "\uff0e", "/", "jobs", "\u00e9", "~"]),
             max_size=8).map("/".join),
))
def test_whatever_the_path_resolve_stays_inside_the_root_or_refuses(tmp_path, relative):
    root = (tmp_path / "root")
    root.mkdir(exist_ok=True)
    try:
        path = storage.resolve(root, relative)
    except storage.StorageError:
        return
    # Anything accepted is a plain name strictly below the root, and reads the same as written.
    assert root.resolve() in path.parents
    assert os.path.commonpath([path, root.resolve()]) == str(root.resolve())
    assert relative.isascii() and "\\" not in relative and ".." not in relative.split("/")
