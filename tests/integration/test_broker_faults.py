"""Broker faults on real parts: redelivered messages and a Redis that restarts empty."""

from __future__ import annotations

import time

import pytest

from tests.integration.cluster import Cluster, assert_no_overlap

pytestmark = pytest.mark.integration

JOB = {"kind": "train", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
       "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 6, "batch_size": 8}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A visibility timeout far shorter than a job: Redis hands every running job's message to
    # the other worker again and again, as it would in production for jobs longer than the timeout.
    c = Cluster(tmp_path_factory.mktemp("broker"), visibility_timeout_seconds=2, unacked_restore_seconds=1)
    c.start_worker()
    c.start_worker()
    c.start_reaper()
    yield c
    c.close()


def test_a_redelivered_message_does_nothing(cluster):
    # The idle worker sweeps every second for messages unacked past 2 s: the job outlasts several.
    job_id = cluster.submit({**JOB, "name": "redelivered", "hyperparameters": {**JOB["hyperparameters"], "epochs": 12}})
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 1 and len(cluster.attempts(job_id)) == 1
    # The duplicate really arrived, and was acknowledged and dropped.
    assert any(f"event=dropped job_id={job_id} " in w.log() for w in cluster.workers)


def test_redis_restarting_empty_loses_no_job_and_runs_none_twice(cluster):
    ids = [cluster.submit({**JOB, "name": f"restart-{i}"}) for i in range(4)]
    # Two run, two wait in the queue; then Redis dies and comes back with nothing in it.
    deadline = time.monotonic() + 60
    while sum(cluster.job(i)["state"] == "running" for i in ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    # The precondition, from the database right before the kill: two jobs are running.
    running = [i for i in ids if cluster.db_job(i).state == "running"]
    assert len(running) == 2, [(i, cluster.db_job(i).state) for i in ids]
    cluster.redis.kill()
    time.sleep(2)
    cluster.redis.start()
    for job_id in ids:
        job = cluster.wait(job_id, timeout=180)
        assert job["state"] == "succeeded", job
        attempts = cluster.attempts(job_id)
        assert len(attempts) == 1, [(a.number, a.outcome) for a in attempts]
        assert_no_overlap(attempts)


def test_a_worker_that_ran_a_job_through_a_redis_restart_reconnects_and_takes_new_jobs(tmp_path):
    # One worker only: if it does not find its way back to the new Redis, nobody runs the new jobs.
    # Redis "vanishes" (a host lost, a failover): the worker's sockets are never closed, they just
    # fall silent, as they do when the peer disappears without a FIN.
    c = Cluster(tmp_path, vanishing_redis=True)
    try:
        only = c.start_worker()
        c.start_reaper()
        long_job = c.submit({**JOB, "name": "through-the-outage", "hyperparameters": {**JOB["hyperparameters"], "epochs": 10}})
        c.wait(long_job, states=("running",), until=lambda j: j["epoch"] >= 1, timeout=120)
        assert c.db_job(long_job).state == "running"  # it really is running when Redis dies
        c.vanishing.vanish()
        time.sleep(2)
        c.vanishing.return_()
        assert c.db_job(long_job).state == "running"  # and it ran through the outage
        assert c.wait(long_job, timeout=180)["state"] == "succeeded"

        later = [c.submit({**JOB, "name": f"after-{i}", "hyperparameters": {**JOB["hyperparameters"], "epochs": 1}})
                 for i in range(4)]
        # Generous for a loaded 2-core machine; without the health checks it stalls 40 s and more.
        for job_id in later:
            assert c.wait(job_id, timeout=120)["state"] == "succeeded"
        for job_id in [long_job, *later]:
            assert [a.worker for a in c.attempts(job_id)] == [only.name], job_id
        # The worker noticed the dead connection and says it reconnected.
        assert "event=broker_reconnected" in only.log_path.read_text(errors="replace"), only.log()[-3000:]
    finally:
        c.close()
