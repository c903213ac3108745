"""Fault injection on real parts: SIGKILL, SIGSTOP, SIGTERM, cancel, pause, poison jobs, lost publishes.

Each test states its pass criterion in its assertions. The cluster has its own database, its own
Redis, real ``kiln worker`` processes and a real ``kiln reaper`` with a 4 s lease.
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime

import pytest
import torch

from app import queue
from app.db import session_scope
from app.jobs import service
from app.jobs.schemas import parse_spec
from app.models import Checkpoint, JobEvent, Metric, User, utcnow
from tests.integration.cluster import Cluster, assert_no_overlap

pytestmark = pytest.mark.integration

# About one second per epoch on one CPU thread: long enough to interrupt mid-epoch.
SLOW = {"kind": "train", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
        "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 8, "batch_size": 8, "seed": 3}}
LOSS_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_f1")


def slow(name: str, **hyper) -> dict:
    return {**SLOW, "name": name, "hyperparameters": {**SLOW["hyperparameters"], **hyper}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    env = {"KILN_FAILPOINT_FAIL_JOBS_NAMED": "poison"}
    c.start_worker(**env)
    c.start_worker(**env)
    c.start_reaper()
    c.failpoint_env = env
    yield c
    c.close()


def running_at_epoch(cluster: Cluster, job_id: int, epoch: int) -> dict:
    return cluster.wait(job_id, states=("running",), until=lambda j: j["epoch"] >= epoch)


def test_sigkill_mid_epoch_resumes_from_checkpoint_with_identical_weights(cluster):
    reference = cluster.submit(slow("reference"))
    killed = cluster.submit(slow("killed"))
    running_at_epoch(cluster, killed, 3)
    victim = cluster.worker_running(killed)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    newest_at_kill = max(c.epoch for c in cluster.rows(Checkpoint, killed))
    cluster.start_worker(**cluster.failpoint_env)  # a replacement, so the job need not wait for the other

    job = cluster.wait(killed, timeout=150)
    ref = cluster.wait(reference, timeout=150)
    assert job["state"] == ref["state"] == "succeeded", job
    attempts = cluster.attempts(killed)
    assert [a.number for a in attempts] == [1, 2]
    assert attempts[0].outcome == "worker_lost"
    assert_no_overlap(attempts)
    assert job["resumed_from_epoch"] == newest_at_kill >= 2
    assert any(e.kind == "resumed" for e in cluster.rows(JobEvent, killed))

    # The resumed run ends exactly where an uninterrupted one does.
    mine, theirs = cluster.final_weights(killed), cluster.final_weights(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.allclose(mine[key], theirs[key], atol=1e-6), key
    for key in LOSS_KEYS:
        assert job["result"]["final_metrics"][key] == pytest.approx(ref["result"]["final_metrics"][key], abs=1e-6)

    # At most the interrupted epoch was redone: attempt 2 reports epochs after the checkpoint only.
    second = [m.epoch for m in cluster.rows(Metric, killed) if m.attempt == 2 and m.scope == "epoch"]
    assert second[0] == job["resumed_from_epoch"] + 1
    # The loss curve a dashboard draws has each epoch once, from the attempt that kept it.
    curve = cluster.client.get(f"/api/v1/jobs/{killed}/metrics?scope=epoch&latest=true",
                               headers=cluster.auth).get_json()["items"]
    assert [m["epoch"] for m in curve] == list(range(1, 9))


def test_sigstopped_worker_past_its_lease_has_its_late_writes_refused(cluster):
    job_id = cluster.submit(slow("stopped"))
    running_at_epoch(cluster, job_id, 2)
    frozen = cluster.worker_running(job_id)
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        cluster.wait(job_id, states=("running",), until=lambda j: j["attempts"] == 2, timeout=60)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    job = cluster.wait(job_id, timeout=150)
    assert job["state"] == "succeeded"
    first, second = cluster.attempts(job_id)
    assert_no_overlap([first, second])
    # The reaper took the frozen worker's job back (this runs on SQLite as on PostgreSQL: no write
    # lock was held while the process was frozen) and the other worker finished it.
    assert first.outcome == "worker_lost" and first.worker == frozen.name
    assert second.worker != frozen.name
    # Once awake, the first attempt learns it lost the lease: from its heartbeat (lease_lost) or from
    # a write the database refused (stale_attempt), whichever comes first. Either way it gives up.
    woke = re.compile(rf"event=(lease_lost|stale_attempt) job_id={job_id} attempt=1\b")
    deadline = time.monotonic() + 20
    while not woke.search(frozen.log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert woke.search(frozen.log()), frozen.log()[-3000:]
    # The database itself says so: the woken attempt did try to write, and the write was refused.
    events = cluster.rows(JobEvent, job_id)
    refused = [e for e in events if e.kind == "write_refused"]
    assert refused and all(e.attempt == 1 and e.at > first.ended_at for e in refused), refused
    assert all("refused" in e.message and "no longer holds the lease" in e.message for e in refused)
    # Nothing else of the first attempt was stored after it ended: no metric, no checkpoint, no event
    # (the reaper's own "running -> queued" record of taking the job back aside).
    assert all(m.at <= first.ended_at for m in cluster.rows(Metric, job_id) if m.attempt == 1)
    assert all(c.created_at <= first.ended_at for c in cluster.rows(Checkpoint, job_id) if c.attempt == 1)
    late = [(e.kind, e.from_state, e.to_state) for e in events if e.attempt == 1 and e.at > first.ended_at
            and e.kind != "write_refused" and not (e.from_state == "running" and e.to_state == "queued")]
    assert late == []
    finished = [e for e in events if e.to_state == "succeeded"]
    assert [e.attempt for e in finished] == [2]


def test_sigterm_checkpoints_and_requeues_the_running_job(cluster):
    job_id = cluster.submit(slow("drained"))
    running_at_epoch(cluster, job_id, 2)
    leaving = cluster.worker_running(job_id)
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=30) is not None
    job = cluster.wait(job_id, timeout=150)
    assert job["state"] == "succeeded"
    events = cluster.rows(JobEvent, job_id)
    assert any(e.to_state == "queued" and "shutting down" in (e.message or "") for e in events)
    assert job["resumed_from_epoch"] is not None and job["resumed_from_epoch"] >= 2
    assert cluster.attempts(job_id)[0].outcome == "queued"
    cluster.start_worker(**cluster.failpoint_env)


def test_cancelling_a_running_job_stops_it_within_five_seconds_with_a_checkpoint(cluster):
    job_id = cluster.submit(slow("cancelled", epochs=30))
    running_at_epoch(cluster, job_id, 1)
    started = time.monotonic()
    assert cluster.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=cluster.auth).status_code == 202
    job = cluster.wait(job_id, states=("cancelled",), timeout=15)
    assert time.monotonic() - started < 5.0
    assert any(c["reason"] == "cancel" for c in job["checkpoints"])

    # Retry continues from that checkpoint.
    assert cluster.client.post(f"/api/v1/jobs/{job_id}/retry", headers=cluster.auth).status_code == 202
    resumed = cluster.wait(job_id, states=("running", "succeeded"),
                           until=lambda j: j["attempts"] == 2 and j["resumed_from_epoch"] is not None)
    assert resumed["resumed_from_epoch"] >= 1
    cluster.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=cluster.auth)
    assert cluster.wait(job_id, states=("cancelled",), timeout=15)["state"] == "cancelled"


def test_pause_frees_the_worker_and_resume_continues(cluster):
    job_id = cluster.submit(slow("paused"))
    running_at_epoch(cluster, job_id, 2)
    assert cluster.client.post(f"/api/v1/jobs/{job_id}/pause", headers=cluster.auth).status_code == 202
    paused = cluster.wait(job_id, states=("paused",), timeout=15)
    assert any(c["reason"] == "pause" for c in paused["checkpoints"])
    assert cluster.client.post(f"/api/v1/jobs/{job_id}/resume", headers=cluster.auth).status_code == 202
    job = cluster.wait(job_id, timeout=150)
    assert job["state"] == "succeeded" and job["resumed_from_epoch"] >= 2
    assert any(e["message"] and e["message"].startswith("resumed from epoch") for e in
               cluster.client.get(f"/api/v1/jobs/{job_id}/events", headers=cluster.auth).get_json()["items"])


def _submit_without_publishing(cluster: Cluster, spec: dict) -> int:
    """What the web does up to the commit, then "crashes" before publishing."""
    with session_scope(cluster.settings.database_url) as s:
        owner = s.query(User).order_by(User.id).first()
        job = service.submit(session=s, owner=owner, spec=parse_spec(spec), settings=cluster.settings)
        return job.id


def test_a_crash_between_commit_and_publish_still_runs_the_job(cluster):
    job_id = _submit_without_publishing(cluster, slow("unpublished", epochs=2))
    job = cluster.wait(job_id, timeout=60)
    assert job["state"] == "succeeded" and job["attempts"] == 1


def test_a_publish_lost_after_the_commit_stamped_it_is_republished_and_runs_exactly_once(cluster):
    # What the web does: the commit stamps published_at (one write transaction), then the LPUSH is
    # lost (the process died, or Redis dropped it). Nothing else will ever publish this job but the
    # reconciler, once the stamp is older than requeue_after_seconds.
    with session_scope(cluster.settings.database_url, write=True) as s:
        owner = s.query(User).order_by(User.id).first()
        job_id = service.submit(session=s, owner=owner, spec=parse_spec(slow("stamped", epochs=1)),
                                settings=cluster.settings, published_at=utcnow()).id
    job = cluster.wait(job_id, timeout=90)
    assert job["state"] == "succeeded" and job["attempts"] == 1
    # The wake-up the web would have sent arrives late, as a duplicate: harmless (the claim is a
    # compare-and-set on the token it carries).
    assert queue.publish(cluster.settings, job_id=job_id, kind="train", token=0)
    deadline = time.monotonic() + 30
    while not any(f"event=dropped job_id={job_id} " in w.log() for w in cluster.workers):
        assert time.monotonic() < deadline, "the duplicate never reached a worker"
        time.sleep(0.2)
    assert [a.number for a in cluster.attempts(job_id)] == [1]
    assert sum(1 for e in cluster.rows(JobEvent, job_id) if e.to_state == "running") == 1


def test_a_cancelled_queued_job_never_starts_even_when_its_message_arrives(cluster):
    # Submitted and cancelled in one transaction, so no reconciler can publish it in between.
    with session_scope(cluster.settings.database_url) as s:
        owner = s.query(User).order_by(User.id).first()
        job_id = service.submit(session=s, owner=owner, spec=parse_spec(slow("never", epochs=2)),
                                settings=cluster.settings).id
        service.cancel(session=s, user=owner, job_id=job_id)
    assert queue.publish(cluster.settings, job_id=job_id, kind="train", token=0)
    deadline = time.monotonic() + 30
    while not any(f"event=dropped job_id={job_id} " in w.log() for w in cluster.workers):
        assert time.monotonic() < deadline, "the message never reached a worker"
        time.sleep(0.2)
    job = cluster.job(job_id)
    assert job["state"] == "cancelled" and job["attempts"] == 0 and job["started_at"] is None


def test_poison_job_fails_after_max_attempts_without_holding_up_others(tmp_path):
    # One worker only: the healthy job runs because the poison one gives the worker back between its
    # attempts, not because a second worker happened to be free.
    c = Cluster(tmp_path)
    try:
        only = c.start_worker(KILN_FAILPOINT_FAIL_JOBS_NAMED="poison")
        c.start_reaper()
        poison = c.submit({**slow("poison-pill", epochs=2), "max_attempts": 2})
        healthy = c.submit(slow("healthy", epochs=2))
        job = c.wait(poison, timeout=120)
        assert job["state"] == "failed" and job["attempts"] == 2
        assert job["error"]["class"] == "internal"
        assert "Traceback" not in job["error"]["message"]
        assert c.wait(healthy, timeout=120)["state"] == "succeeded"
        assert [a.worker for a in c.attempts(poison)] == [only.name, only.name]
        assert [a.worker for a in c.attempts(healthy)] == [only.name]
        kinds = [e["kind"] for e in c.client.get(f"/api/v1/jobs/{poison}/events", headers=c.auth).get_json()["items"]]
        assert "traceback" not in kinds  # the owner sees the message; the traceback is for operators
        assert any(e.kind == "traceback" and "InjectedFault" in e.data["traceback"] for e in c.rows(JobEvent, poison))
    finally:
        c.close()


def test_resume_skips_a_corrupt_newest_checkpoint_and_uses_the_one_before(cluster):
    job_id = cluster.submit(slow("corrupted"))
    running_at_epoch(cluster, job_id, 3)
    cluster.client.post(f"/api/v1/jobs/{job_id}/pause", headers=cluster.auth)
    paused = cluster.wait(job_id, states=("paused",), timeout=15)
    newest, previous = sorted(paused["checkpoints"], key=lambda c: c["step"], reverse=True)[:2]
    path = cluster.settings.storage_root / newest["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the sha256 no longer matches
    path.write_bytes(bytes(data))
    cluster.client.post(f"/api/v1/jobs/{job_id}/resume", headers=cluster.auth)
    job = cluster.wait(job_id, timeout=150)
    assert job["state"] == "succeeded"
    assert previous["step"] < newest["step"]
    assert job["resumed_from_epoch"] == previous["epoch"]
    skipped = [e for e in cluster.rows(JobEvent, job_id) if e.kind == "checkpoint_skipped"]
    assert skipped and "sha256" in skipped[0].message


def test_an_attempt_past_max_attempt_runtime_fails_as_timeout_and_a_retry_gets_a_fresh_budget(cluster):
    job_id = cluster.submit({**slow("too-slow", epochs=200), "max_attempt_runtime_s": 6})
    job = cluster.wait(job_id, timeout=90)
    assert job["state"] == "failed" and job["error"]["class"] == "timeout"
    assert "max_attempt_runtime_s" in job["error"]["message"] and job["attempts"] == 1
    first = [c for c in job["checkpoints"] if c["reason"] == "timeout"]
    assert first and first[0]["attempt"] == 1
    # "Retry to continue": the bound is per attempt, so the retry runs its own full budget from
    # the checkpoint (a bound counted from the first start would stop it at once), then times out.
    assert cluster.client.post(f"/api/v1/jobs/{job_id}/retry", headers=cluster.auth).status_code == 202
    job = cluster.wait(job_id, timeout=90, until=lambda j: j["attempts"] == 2)
    assert job["state"] == "failed" and job["error"]["class"] == "timeout" and job["attempts"] == 2
    assert any(c["reason"] == "timeout" and c["attempt"] == 2 for c in job["checkpoints"])
    history = job["attempt_history"]
    assert [(a["number"], a["outcome"]) for a in history] == [(1, "timeout"), (2, "timeout")]
    second = history[1]
    ran = datetime.fromisoformat(second["ended_at"]) - datetime.fromisoformat(second["started_at"])
    assert ran.total_seconds() >= 6 - 0.5  # a lower bound only: a loaded machine makes it longer