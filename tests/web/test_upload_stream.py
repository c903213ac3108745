"""A large upload streams to storage: a real ``kiln web`` (gunicorn) takes 1 GB without its memory growing."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid

import psutil
import pytest

from app.accounts import create_user
from app.db import session_scope
from tests.conftest import WebProcess, settings_env

UPLOAD_BYTES = 1024 * 1024 * 1024  # the 1 GB of issue 10
# The web process may grow by this much at most while it takes the upload (it would grow by the
# upload's size, and more, if the file were read into memory).
RSS_GROWTH_BOUND = 100 * 1024 * 1024


@pytest.fixture
def web(settings, tmp_path):
    """A real ``kiln web`` subprocess whose upload limit admits the test file; yields (port, process)."""
    env = settings_env(settings) | {"KILN_MAX_UPLOAD_BYTES": str(UPLOAD_BYTES + 1024 * 1024)}
    server = WebProcess(env, tmp_path / "web.log").wait_ready()
    yield server.port, server.proc
    server.stop()


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (gunicorn's master and worker)."""
    total = 0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def csv_chunks(total: int):
    """A CSV of about ``total`` bytes, made on the fly in 1 MiB chunks (never held whole)."""
    yield b"x,y,label\n"
    row = b"".join(f"{i % 97},{i % 13}.5,{i % 2}\n".encode() for i in range(40_000))
    sent = 0
    while sent < total:
        piece = row[: min(len(row), total - sent)]
        piece = piece[: piece.rfind(b"\n") + 1] or row
        sent += len(piece)
        yield piece


def test_a_1_gb_upload_streams_without_the_web_process_growing(web, settings):
    port, proc = web
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=f"u{uuid.uuid4().hex[:12]}@example.com")
    auth = {"Authorization": f"Bearer {token}"}
    # Warm the worker up (imports, pandas) so the baseline is the process at work, not at rest.
    small = _post(port, auth, [b"x,y\n1,2\n3,4\n"], 12)
    assert small[0] == 201, small
    base = tree_rss(proc.pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    size = sum(len(c) for c in csv_chunks(UPLOAD_BYTES))
    rows = sum(c.count(b"\n") for c in csv_chunks(UPLOAD_BYTES)) - 1
    sampler.start()
    try:
        status, body = _post(port, auth, csv_chunks(UPLOAD_BYTES), size)
    finally:
        done.set()
        sampler.join()
    assert status == 201, body
    assert body["size_bytes"] == size and body["rows"] == rows
    assert [c["name"] for c in body["schema"]["columns"]] == ["x", "y", "label"]
    assert peak[0] - base < RSS_GROWTH_BOUND, f"web RSS grew by {(peak[0] - base) / 2**20:.0f} MiB"
    # The stored file is removed again, so the test leaves little on disk.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("DELETE", f"/api/v1/datasets/{body['id'].split(':')[1]}", headers=auth)
    assert conn.getresponse().status == 204


def _post(port: int, auth: dict, chunks, size: int) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.putrequest("POST", "/api/v1/datasets")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + size + len(tail)))
    for name, value in auth.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(head)
    for chunk in chunks:
        conn.send(chunk)
    conn.send(tail)
    response = conn.getresponse()
    return response.status, json.loads(response.read())
