"""``kiln.client.KilnClient`` against a real ``kiln web`` and worker, and its retries against a stub server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiln.client import (
    Conflict, InvalidSpec, KilnClient, KilnConnectionError, NotFound, RateLimited, Unauthorized,
)
from tests.client.conftest import IRIS_SPEC
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

JOB = {"id": 7, "kind": "train", "state": "queued"}
PROBLEM_429 = {"type": "/problems/http-error", "title": "Too Many Requests", "status": 429, "detail": "slow down"}


class Stub:
    """A tiny HTTP server on 127.0.0.1 that answers each request with the next step of a script:
    ``"drop"`` (close the connection without an answer) or ``(status, headers, body)``; the last step repeats."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append((self.command, self.path, dict(self.headers)))
                step = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                if step == "drop":
                    self.close_connection = True
                    return
                status, headers, body = step
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    made: list[Stub] = []

    def _make(*script) -> Stub:
        made.append(Stub(*script))
        return made[-1]

    yield _make
    for s in made:
        s.close()


def test_a_429_with_retry_after_is_retried_after_waiting(stub):
    s = stub((429, {"Retry-After": "1"}, PROBLEM_429), (200, {}, {"items": [JOB], "next_cursor": None}))
    started = time.monotonic()
    with KilnClient(s.url, "t") as client:
        assert client.list_jobs()["items"] == [JOB]
    assert time.monotonic() - started >= 0.9  # it honoured Retry-After
    assert len(s.requests) == 2


def test_the_client_gives_up_on_429_after_its_bound(stub):
    s = stub((429, {"Retry-After": "1"}, PROBLEM_429))
    with KilnClient(s.url, "t", rate_limit_retries=2) as client, pytest.raises(RateLimited) as caught:
        client.submit(IRIS_SPEC)
    assert caught.value.status == 429 and caught.value.retry_after == 1 and caught.value.detail == "slow down"
    assert len(s.requests) == 3


def test_a_get_is_retried_after_a_dropped_connection(stub):
    s = stub("drop", "drop", (200, {}, JOB))
    with KilnClient(s.url, "t", backoff=0.05) as client:
        assert client.get_job(7) == JOB
    assert [r[0] for r in s.requests] == ["GET"] * 3


def test_a_get_gives_up_after_its_bound(stub):
    s = stub("drop")
    with KilnClient(s.url, "t", backoff=0.05, connect_retries=2) as client, pytest.raises(KilnConnectionError):
        client.get_job(7)
    assert len(s.requests) == 3


def test_a_post_without_idempotency_key_is_never_resent(stub):
    s = stub("drop", (202, {}, JOB))
    with KilnClient(s.url, "t", backoff=0.05) as client, pytest.raises(KilnConnectionError) as caught:
        client.cancel(7)
    assert caught.value.status is None and "cannot reach" in str(caught.value)
    assert [r[0] for r in s.requests] == ["POST"]  # the job may have been cancelled: not sent twice


def test_a_submit_carries_one_idempotency_key_and_is_resent_with_it(stub):
    s = stub("drop", (201, {}, JOB))
    with KilnClient(s.url, "t", backoff=0.05) as client:
        assert client.submit(IRIS_SPEC) == JOB
        client.submit(IRIS_SPEC)
    keys = [r[2].get("Idempotency-Key") for r in s.requests]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]  # one key per logical submit
    uuid.UUID(keys[0])


def test_the_client_runs_a_training_job_and_reads_it(server, worker):
    with KilnClient(server.url, server.token) as client:
        job = client.submit(dict(IRIS_SPEC, name="client-iris"))
        assert job["state"] == "queued"
        done = client.wait(job["id"], timeout=240)
        assert done["state"] == "succeeded", (done, worker.log())
        assert done["model"]["ref"] == "client-iris@1"
        assert [m["epoch"] for m in client.metrics(job["id"], scope="epoch", latest=True)["items"]] == [1, 2]
        assert [e["to"] for e in client.events(job["id"]) if e["to"]][-1] == "succeeded"
        assert "client-iris@1" in [m["ref"] for m in client.models()]
        assert job["id"] in [j["id"] for j in client.list_jobs(kind="train", state="succeeded")["items"]]
        # An unchanged job polls as a 304, answered from the client's copy.
        before = client.stats["not_modified"]
        assert client.get_job(job["id"]) == done
        assert client.stats["not_modified"] == before + 1
        with pytest.raises(Conflict) as caught:
            client.cancel(job["id"])
        assert caught.value.type == "/problems/conflict"


def test_errors_carry_the_problem_detail(server):
    with KilnClient(server.url, server.token) as client:
        with pytest.raises(NotFound) as caught:
            client.get_job(2_000_000_000)
        assert (caught.value.status, caught.value.type, caught.value.title) == (404, "/problems/not-found", "Not Found")
        with pytest.raises(InvalidSpec) as caught:
            client.submit(dict(IRIS_SPEC, model={"arch": "resnet9000"}))
        assert caught.value.status == 422 and "model" in [e["field"].split(".")[0] for e in caught.value.errors]
    with KilnClient(server.url, "not-a-token") as client, pytest.raises(Unauthorized) as caught:
        client.list_jobs()
    assert caught.value.status == 401


def test_importing_the_client_loads_neither_torch_nor_flask():
    out = subprocess.run([sys.executable, "-c", "import kiln.client, sys; print('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "kiln.client" in out and "httpx" in out
    assert not [m for m in out if m.split(".")[0] in ("torch", "flask", "app", "worker")]
