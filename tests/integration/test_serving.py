"""Models as services on real parts: inline answers, micro-batching, separate queues, batch files.

A private cluster (its own database, Redis and ``kiln worker`` processes) lets each test choose
which workers run: none (the request answers 202), a stopped predict worker (requests pile up and
are batched), a busy train worker next to a free predict worker, a killed batch-file worker.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from app import storage
from app.db import get_engine, session_scope
from app.models import Checkpoint, JobEvent, ModelVersion
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration

TRAIN = {"kind": "train", "name": "svc-iris", "model": {"arch": "mlp", "hidden_sizes": [16]},
         "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 2, "seed": 1}}
# About one second per epoch on one CPU thread: the train worker stays busy for a while.
LONG_TRAIN = {"kind": "train", "name": "svc-long", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
              "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 30, "batch_size": 8, "seed": 3}}
RNG = np.random.default_rng(0)


def rows(n: int) -> list[list[float]]:
    return [[round(float(v), 3) for v in r] for r in RNG.uniform(0.1, 7.5, size=(n, 4))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("serving"))
    c.start_reaper()
    # The model is trained in this process, through the runner (no worker is running yet).
    from worker import runner

    job_id = c.submit(TRAIN)
    assert runner.run(job_id, 0, worker="trainer", settings=c.settings) == "succeeded"
    c.model = c.job(job_id)["result"]["model"]
    yield c
    c.close()


def stop_workers(cluster: Cluster) -> None:
    for w in cluster.workers:
        w.stop()
    cluster.workers = [w for w in cluster.workers if w.proc.poll() is None]


def unbatched(cluster: Cluster, inputs: list, model: str | None = None) -> list[dict]:
    """What the model (default: the cluster's) predicts for ``inputs`` alone, computed here, outside any worker."""
    from worker.ml import prediction

    with session_scope(cluster.settings.database_url) as s:
        name, version = (model or cluster.model).split("@")
        mv = s.query(ModelVersion).filter_by(name=name, version=int(version)).one()
        ckpt = s.get(Checkpoint, mv.checkpoint_id)
        data = storage.read_verified(cluster.settings.storage_root, ckpt.path, ckpt.sha256)
    return prediction.predict(data, inputs)["predictions"]


def test_without_a_worker_the_request_answers_202_holds_no_connection_and_finishes_later(cluster, monkeypatch):
    stop_workers(cluster)
    engine = get_engine(cluster.settings.database_url)
    from app.web import inline

    # The wait is watched from inside: a counter odd while the request waits on Redis, so a sample
    # counts only when the counter was odd and unchanged around it (not the submit before the wait,
    # nor the read of the job after it).
    phase = [0]
    at_entry: list[int] = []
    real_wait = inline.wait_finished

    def watched_wait(*args, **kwargs):
        at_entry.append(engine.pool.checkedout())
        phase[0] += 1
        try:
            return real_wait(*args, **kwargs)
        finally:
            phase[0] += 1

    monkeypatch.setattr(inline, "wait_finished", watched_wait)
    samples: list[int] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            before = phase[0]
            held = engine.pool.checkedout()
            if before % 2 == 1 and phase[0] == before:
                samples.append(held)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    r = cluster.client.post(f"/api/v1/models/{cluster.model}/predict?wait=3", json={"inputs": rows(2)},
                            headers=cluster.auth)
    waited = time.monotonic() - started
    done.set()
    sampler.join()
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["state"] == "queued" and r.headers["Location"].endswith(f"/jobs/{r.get_json()['id']}")
    assert waited >= 2.5  # it did wait for the result before giving up
    # While it waited on Redis, the web process held no database connection.
    assert at_entry and max(at_entry) == 0, at_entry
    assert len(samples) >= 10 and max(samples) == 0, samples
    cluster.start_worker(queues="predict")
    job = cluster.wait(r.get_json()["id"], timeout=120)
    assert job["state"] == "succeeded" and len(job["result"]["predictions"]) == 2


def test_inline_prediction_returns_the_result_in_the_response(cluster):
    if not cluster.workers:
        cluster.start_worker(queues="predict")
    inputs = rows(3)
    r = cluster.client.post(f"/api/v1/models/{cluster.model}/predict?wait=60", json={"inputs": inputs},
                            headers=cluster.auth)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["state"] == "succeeded" and [p["class"] for p in body["result"]["predictions"]] == \
        [p["class"] for p in unbatched(cluster, inputs)]
    # The same through the jobs API with ?wait=.
    r = cluster.client.post("/api/v1/jobs?wait=60", json={"kind": "predict", "model": cluster.model, "inputs": inputs},
                            headers=cluster.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "succeeded", r.get_json()
    # Bad input is a clear 4xx, not a 500.
    bad = cluster.client.post(f"/api/v1/models/{cluster.model}/predict?wait=abc", json={"inputs": inputs},
                              headers=cluster.auth)
    assert bad.status_code == 422
    bad = cluster.client.post(f"/api/v1/models/{cluster.model}/predict", json={"inputs": [[1, 2]]},
                              headers=cluster.auth)
    assert bad.status_code == 422


def test_32_queued_requests_run_in_fewer_forward_passes_with_unbatched_results(cluster):
    stop_workers(cluster)
    requests = [rows(1 + i % 3) for i in range(32)]
    ids = []
    for inputs in requests:
        r = cluster.client.post("/api/v1/jobs", json={"kind": "predict", "model": cluster.model, "inputs": inputs},
                                headers=cluster.auth)
        assert r.status_code == 201, r.get_json()
        ids.append(r.get_json()["id"])
    cluster.start_worker(queues="predict")
    batches = {}
    for job_id, inputs in zip(ids, requests):
        job = cluster.wait(job_id, timeout=120)
        assert job["state"] == "succeeded", job
        for got, want in zip(job["result"]["predictions"], unbatched(cluster, inputs), strict=True):
            assert got["class"] == want["class"]
            assert np.allclose(got["probabilities"], want["probabilities"], atol=1e-6, rtol=0)
        (event,) = [e for e in cluster.rows(JobEvent, job_id) if e.kind == "batched"]
        batches[event.data["batch_id"]] = event.data
    passes = sum(b["forward_passes"] for b in batches.values())
    assert passes < len(ids), batches
    assert max(b["batch_size"] for b in batches.values()) > 1


def test_a_prediction_finishes_while_a_long_training_job_runs(cluster):
    stop_workers(cluster)
    cluster.start_worker(queues="train")
    cluster.start_worker(queues="predict")
    training = cluster.submit(LONG_TRAIN)
    cluster.wait(training, states=("running",), until=lambda j: j["epoch"] >= 1, timeout=120)
    r = cluster.client.post(f"/api/v1/models/{cluster.model}/predict?wait=30", json={"inputs": rows(2)},
                            headers=cluster.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "succeeded", r.get_json()
    assert cluster.job(training)["state"] == "running"
    cluster.client.post(f"/api/v1/jobs/{training}/cancel", headers=cluster.auth)
    cluster.wait(training, timeout=120)


def test_batch_file_of_10000_rows_survives_sigkill_with_every_row_once(cluster):
    stop_workers(cluster)
    with session_scope(cluster.settings.database_url) as s:
        name, version = cluster.model.split("@")
        names = s.query(ModelVersion).filter_by(name=name, version=int(version)).one().signature["feature_names"]
    bad = {17, 4242, 9999}
    lines = [",".join(f'"{n}"' for n in names)]
    for i, row in enumerate(rows(10_000)):
        lines.append(",".join("x" if i in bad and j == 0 else str(v) for j, v in enumerate(row)))
    r = cluster.client.post("/api/v1/datasets", headers=cluster.auth, content_type="multipart/form-data",
                            data={"file": (io.BytesIO("\n".join(lines).encode()), "rows.csv")})
    assert r.status_code == 201, r.get_json()
    dataset = r.get_json()["id"]
    env = {"KILN_PREDICT_CHUNK_ROWS": "250", "KILN_FAILPOINT_CHUNK_SLEEP_S": "0.3"}
    victim = cluster.start_worker(queues="predict", **env)
    job_id = cluster.submit({"kind": "predict", "model": cluster.model, "dataset": dataset})
    committed = lambda: [e.data["rows"] for e in cluster.rows(JobEvent, job_id) if e.kind == "output_committed"]  # noqa: E731
    deadline = time.monotonic() + 120
    while (not committed() or committed()[-1] < 2000) and time.monotonic() < deadline:
        time.sleep(0.1)
    at_kill = committed()[-1]
    assert 2000 <= at_kill < 10_000
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    cluster.start_worker(queues="predict", **env)
    job = cluster.wait(job_id, timeout=180)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2 and job["result"]["rows"] == 10_000 and job["result"]["rows_failed"] == len(bad)
    # The second attempt went on from the last committed chunk, not from the start.
    second = [e.data["rows"] for e in cluster.rows(JobEvent, job_id) if e.kind == "output_committed" and e.attempt == 2]
    assert second[0] > at_kill >= 2000
    out = cluster.client.get(f"/api/v1/jobs/{job_id}/output", headers=cluster.auth)
    assert out.status_code == 200 and out.mimetype == "application/x-ndjson"
    records = [json.loads(line) for line in out.data.decode().splitlines()]
    assert [rec["row"] for rec in records] == list(range(10_000))  # every row exactly once, in order
    assert {rec["row"] for rec in records if "error" in rec} == bad
    assert all("prediction" in rec for rec in records if rec["row"] not in bad)
    # Without a valid token there is no file.
    assert cluster.client.get(f"/api/v1/jobs/{job_id}/output", headers={"Authorization": "Bearer nope"}).status_code == 401


def _train_version(cluster: Cluster, name: str, seed: int) -> tuple[str, Checkpoint]:
    """Train a model version here, through the runner; its ref and its checkpoint row."""
    from worker import runner

    job_id = cluster.submit({**TRAIN, "name": name, "hyperparameters": {"epochs": 2, "seed": seed}})
    assert runner.run(job_id, 0, worker="trainer", settings=cluster.settings) == "succeeded"
    ref = cluster.job(job_id)["result"]["model"]
    with session_scope(cluster.settings.database_url) as s:
        ckpt = s.get(Checkpoint, s.query(ModelVersion).filter_by(job_id=job_id).one().checkpoint_id)
        s.expunge(ckpt)
    return ref, ckpt


def _wait_for_log(worker, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = worker.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in the worker's log:\n{worker.log()}")


def test_a_warm_alias_is_loaded_at_worker_start_so_its_first_prediction_reads_no_file(cluster):
    stop_workers(cluster)
    warm_ref, warm = _train_version(cluster, "svc-warm", seed=2)
    cold_ref, cold = _train_version(cluster, "svc-cold", seed=3)
    name, version = warm_ref.split("@")
    r = cluster.client.put(f"/api/v1/models/{name}/aliases/production", headers=cluster.auth,
                           json={"version": int(version), "serving": {"warm": True}})
    assert r.status_code == 200, r.get_json()
    inputs = rows(2)
    expected = unbatched(cluster, inputs, warm_ref)
    worker = cluster.start_worker(queues="predict")
    log = _wait_for_log(worker, "event=warm_up_done")
    assert f"event=model_warmed model={warm_ref} sha256={warm.sha256}" in log
    assert cold_ref not in log
    # Garbage in place of both checkpoint files: any read would fail its sha256 check.
    for ckpt in (warm, cold):
        storage.resolve(cluster.settings.storage_root, ckpt.path).write_bytes(b"not a checkpoint")
    r = cluster.client.post(f"/api/v1/models/{name}@production/predict?wait=60", json={"inputs": inputs},
                            headers=cluster.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "succeeded", r.get_json()
    assert r.get_json()["result"]["model"] == warm_ref
    for got, want in zip(r.get_json()["result"]["predictions"], expected, strict=True):
        assert got["class"] == want["class"]
        assert np.allclose(got["probabilities"], want["probabilities"], atol=1e-6, rtol=0)
    # The version no warm alias names was not loaded: its first prediction must read the file, and fails.
    r = cluster.client.post(f"/api/v1/models/{cold_ref}/predict?wait=60", json={"inputs": inputs},
                            headers=cluster.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "failed", r.get_json()
    assert r.get_json()["error"]["class"] == "user_error" and "cannot be loaded" in r.get_json()["error"]["message"]


def test_deleting_a_version_evicts_it_from_a_running_workers_cache(cluster):
    stop_workers(cluster)
    ref, ckpt = _train_version(cluster, "svc-delete", seed=4)
    worker = cluster.start_worker(queues="predict")
    r = cluster.client.post(f"/api/v1/models/{ref}/predict?wait=60", json={"inputs": rows(1)}, headers=cluster.auth)
    assert r.status_code == 200 and r.get_json()["state"] == "succeeded", r.get_json()  # now in the worker's cache
    name, version = ref.split("@")
    assert cluster.client.delete(f"/api/v1/models/{name}/versions/{version}", headers=cluster.auth).status_code == 204
    # The worker process (not this one, which handled the delete) drops the one model it held.
    _wait_for_log(worker, f"event=model_evicted sha256={ckpt.sha256} models=1 how=signal")
    r = cluster.client.post(f"/api/v1/models/{ref}/predict?wait=5", json={"inputs": rows(1)}, headers=cluster.auth)
    assert r.status_code == 422 and "was deleted" in r.get_json()["detail"]
