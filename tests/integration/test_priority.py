"""Job priority reaches the broker: a waiting high-priority job runs before earlier low ones."""

from __future__ import annotations

import pytest

from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration

TINY = {"kind": "train", "model": {"arch": "mlp", "hidden_sizes": [16]}, "dataset": {"id": "builtin:iris"},
        "hyperparameters": {"epochs": 1}}


def test_high_priority_jobs_start_first(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        # Queued while no worker is online, in the order low, normal, high.
        ids = {p: cluster.submit({**TINY, "name": f"prio-{p}", "priority": p}) for p in ("low", "normal", "high")}
        cluster.start_worker(queues="train")  # one solo worker: it takes one message at a time
        jobs = {p: cluster.wait(job_id, timeout=60) for p, job_id in ids.items()}
        assert all(j["state"] == "succeeded" for j in jobs.values()), jobs
        order = sorted(jobs, key=lambda p: jobs[p]["started_at"])
        assert order == ["high", "normal", "low"]
    finally:
        cluster.close()
