"""Chaos run: N training jobs on several workers while workers are SIGKILLed and Redis restarts empty.

    .venv/bin/python -m bench.chaos --jobs 20 --kills 10 --redis-restarts 2

Prints submitted, succeeded, lost, run twice, overlapping attempts and the most epochs redone
after one kill; exits 1 if any job was lost or ran twice. Uses its own SQLite database (or
PostgreSQL with KILN_TEST_DATABASE=postgresql) and its own Redis; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.cluster import Cluster

SPEC = {"kind": "train", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
        "dataset": {"id": "builtin:digits"}, "max_attempts": 20}
STEP_REPORTS_EVERY = 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--redis-restarts", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", type=Path, help="also write the summary here")
    return p.parse_args(argv)


def summarize(cluster: Cluster, ids: list[int]) -> dict:
    """Count outcomes from the database: the attempts and events are the evidence."""
    from app.models import JobEvent, Metric

    succeeded = lost = run_twice = overlapping = most_redone = 0
    for job_id in ids:
        job = cluster.job(job_id)
        succeeded += job["state"] == "succeeded"
        lost += job["state"] != "succeeded"
        attempts = cluster.attempts(job_id)
        pairs = 0
        for i, a in enumerate(attempts):
            for b in attempts[i + 1:]:
                a_end = a.ended_at or b.started_at.replace(year=9999)
                if b.started_at < a_end and a.started_at < (b.ended_at or a_end):
                    pairs += 1
        overlapping += pairs
        finishes = [e for e in cluster.rows(JobEvent, job_id) if e.to_state == "succeeded"]
        run_twice += pairs > 0 or len(finishes) > 1
        # The furthest epoch each attempt reached: an epoch report counts a finished epoch, a step
        # report the epoch in progress, so a kill mid-epoch counts that epoch as one to redo.
        epochs_by_attempt: dict[int, int] = {}
        for m in cluster.rows(Metric, job_id):
            if m.scope in ("epoch", "step"):
                epochs_by_attempt[m.attempt] = max(epochs_by_attempt.get(m.attempt, 0), m.epoch)
        for a in attempts[1:]:
            reached = max((e for n, e in epochs_by_attempt.items() if n < a.number), default=0)
            most_redone = max(most_redone, reached - a.start_epoch)
    return {"submitted": len(ids), "succeeded": succeeded, "lost": lost, "run_twice": run_twice,
            "overlapping_attempts": overlapping, "most_epochs_redone_after_one_kill": most_redone}


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kiln-chaos-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            for _ in range(args.workers):
                cluster.start_worker()
            cluster.start_reaper()
            ids = [cluster.submit({**SPEC, "name": f"chaos-{i}",
                                   "hyperparameters": {"epochs": args.epochs, "batch_size": 8, "seed": i,
                                                       "log_every_steps": STEP_REPORTS_EVERY}})
                   for i in range(args.jobs)]
            started = time.monotonic()
            events = ["kill"] * args.kills + ["redis"] * args.redis_restarts
            rng.shuffle(events)
            kills = restarts = 0
            for what in events:
                time.sleep(rng.uniform(2.0, 5.0))
                if what == "kill":
                    alive = [w for w in cluster.workers if w.proc.poll() is None]
                    victim = rng.choice(alive)
                    os.kill(victim.proc.pid, signal.SIGKILL)
                    victim.proc.wait()
                    cluster.start_worker()
                    kills += 1
                else:
                    cluster.redis.kill()
                    time.sleep(1.0)
                    cluster.redis.start()
                    restarts += 1
                print(f"[{time.monotonic() - started:6.1f}s] {what}", flush=True)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                states = [cluster.job(i)["state"] for i in ids]
                if all(s in ("succeeded", "failed", "cancelled") for s in states):
                    break
                time.sleep(1.0)
            summary = summarize(cluster, ids)
            summary.update(workers=args.workers, kills=kills, redis_restarts=restarts,
                           wall_seconds=round(time.monotonic() - started, 1))
        finally:
            cluster.close()
    for key, value in summary.items():
        print(f"{key.replace('_', ' ')}: {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["lost"] or summary["run_twice"] else 0


if __name__ == "__main__":
    sys.exit(main())
