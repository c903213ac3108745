"""Streaming generation end to end: a real ``kiln worker`` writes tokens to Redis while the web relays them
as Server-Sent Events, and the first pieces arrive while the job is still running."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from markupsafe import escape

from app.accounts import create_user
from app.db import session_scope
from app.models import Job
from tests.conftest import run_inline
from tests.web.test_pages import PASSWORD, sign_in
from worker import runner

TRAIN = {"kind": "train", "model": {"arch": "causal_lm", "d_model": 32, "nhead": 2, "num_layers": 1,
                                    "dim_feedforward": 64, "block_size": 16, "dropout": 0.0},
         "dataset": {"id": "builtin:fortunes"}, "hyperparameters": {"epochs": 1, "batch_size": 64, "learning_rate": 3e-3}}


def sse_events(response):
    """(event, data) pairs of a streamed text/event-stream response, as they arrive."""
    buffer = ""
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
            if "event" in lines:
                yield lines["event"], json.loads(lines["data"])


@pytest.fixture
def owner(settings):
    """A user with a password (for the pages) and a token (for the API): (email, bearer headers)."""
    email = f"gen-{uuid.uuid4().hex[:10]}@example.com"
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=email, password=PASSWORD)
    return email, {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth(owner):
    """The owner's bearer headers."""
    return owner[1]


@pytest.fixture
def language_model(client, auth, settings):
    """A tiny character LM trained in this process through the runner: its model reference."""
    response = client.post("/api/v1/jobs", json={**TRAIN, "name": f"lm-{uuid.uuid4().hex[:6]}"}, headers=auth)
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]
    assert run_inline(settings, job_id) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "succeeded", job.error_message
        return job.result["model"]


@pytest.fixture
def cluster(tmp_path):
    """A private Kiln (database, Redis, app): the only worker on its queues is the one this test starts,
    so the job runs with the slow-token failpoint whatever other tests left running."""
    from tests.integration.cluster import Cluster

    c = Cluster(tmp_path)
    yield c
    c.close()


def test_tokens_stream_while_the_job_runs_and_the_stream_ends_with_it(cluster):
    app, client = cluster.app, cluster.client
    email = f"gen-{uuid.uuid4().hex[:10]}@example.com"
    with session_scope(cluster.settings.database_url) as s:
        _, token = create_user(session=s, email=email, password=PASSWORD)
    auth = {"Authorization": f"Bearer {token}"}
    response = client.post("/api/v1/jobs", json={**TRAIN, "name": f"lm-{uuid.uuid4().hex[:6]}"}, headers=auth)
    assert response.status_code == 201, response.get_json()
    train_id = response.get_json()["id"]
    assert runner.run(train_id, 0, worker="trainer", settings=cluster.settings) == "succeeded"
    language_model = client.get(f"/api/v1/jobs/{train_id}", headers=auth).get_json()["result"]["model"]
    browser = app.test_client()
    assert sign_in(browser, email, PASSWORD).status_code == 302
    # Each published piece waits 50 ms on the worker, so 120 tokens keep the job running for seconds.
    worker = cluster.start_worker(queues="predict", KILN_FAILPOINT_TOKEN_SLEEP_S="0.05")
    response = client.post("/api/v1/jobs", headers=auth, json={
        "kind": "predict", "model": language_model, "prompt": "The ", "max_new_tokens": 120, "seed": 3})
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]
    stream = app.test_client().get(f"/api/v1/jobs/{job_id}/stream", headers=auth, buffered=False)
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    pieces, states_seen, ended = [], [], None
    started = time.monotonic()
    for event, data in sse_events(stream):
        if event == "token":
            pieces.append(data["text"])
            if len(pieces) == 1:
                states_seen.append(client.get(f"/api/v1/jobs/{job_id}", headers=auth).get_json()["state"])
                running_page = browser.get(f"/jobs/{job_id}").get_data(as_text=True)
        elif event == "end":
            ended = data
            break
        assert time.monotonic() - started < 120, worker.log()
    stream.close()
    assert states_seen == ["running"], worker.log()
    assert ended == {"state": "succeeded"}
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).get_json()
    assert job["state"] == "succeeded", job
    generated = job["result"]["generations"][0]
    assert generated["tokens"] == 120 and "".join(pieces) == generated["text"]
    # The page streams while the job runs (generation.js), and shows the final text without JavaScript after.
    assert f'data-stream-url="/api/v1/jobs/{job_id}/stream"' in running_page and "generation.js" in running_page
    final_page = browser.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "data-stream-url" not in final_page and str(escape(generated["text"])) in final_page


def test_another_users_stream_is_not_found_and_generation_settings_need_a_text_generator(client, auth, make_user,
                                                                                          language_model):
    response = client.post("/api/v1/jobs", headers=auth, json={
        "kind": "predict", "model": language_model, "prompt": "A", "beam_size": 2})
    assert response.status_code == 422 and "beam_size" in json.dumps(response.get_json())
    response = client.post("/api/v1/jobs", headers=auth, json={
        "kind": "predict", "model": language_model, "inputs": [[1, 2]]})
    assert response.status_code == 422
    job_id = client.post("/api/v1/jobs", headers=auth, json={
        "kind": "predict", "model": language_model, "prompt": "A", "max_new_tokens": 2}).get_json()["id"]
    _, other = make_user()
    assert client.get(f"/api/v1/jobs/{job_id}/stream", headers={"Authorization": f"Bearer {other}"}).status_code == 404
