"""A prediction's cost in the worker process alone: ``runner.run`` in-process, no Celery, no web.

Trains a tiny MLP, then runs ``--requests`` lone predictions one after another (each submitted
unpublished, then run by ``runner.run`` on the warm model) and ``--batches`` drains of a lead with
``--batch-size - 1`` queued companions, printing the worker thread's CPU time and the wall time
per job (medians over the jobs). ``--profile`` prints where the lone predictions' time goes
(cProfile, cumulative). Usage::

    python -m bench.worker_cpu --backend postgresql --requests 60 --batches 5
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from app.accounts import create_user
from app.db import session_scope
from app.jobs import service
from app.jobs.schemas import parse_spec
from app.models import Job, User
from app.settings import SETTINGS
from bench.stack import Stack
from worker import runner

TRAIN = {"kind": "train", "name": "cpu-mlp", "model": {"arch": "mlp", "hidden_sizes": [16]},
         "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 1, "batch_size": 16}}
ROW = [5.1, 3.5, 1.4, 0.2]


def _submit(settings, owner_id: int, spec: dict) -> int:
    with session_scope(settings.database_url, write=True) as s:
        return service.submit(session=s, owner=s.get(User, owner_id), spec=parse_spec(spec), settings=settings).id


def _run(settings, job_id: int) -> tuple[float, float]:
    """Run one queued job to its end here; (thread CPU ms, wall ms)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    outcome = runner.run(job_id, 0, worker="bench", settings=settings)
    cpu, wall = (time.thread_time() - c0) * 1000, (time.perf_counter() - t0) * 1000
    if outcome != "succeeded":
        raise RuntimeError(f"job {job_id}: {outcome}")
    return cpu, wall


def measure(settings, requests: int, batches: int, batch_size: int, profile: bool) -> dict[str, float]:
    """Medians of the lone and batched predictions' CPU and wall time per job, in ms."""
    with session_scope(settings.database_url, write=True) as s:
        owner_id = create_user(session=s, email="bench-cpu@example.com")[0].id
    train_id = _submit(settings, owner_id, TRAIN)
    assert runner.run(train_id, 0, worker="bench", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        model = s.get(Job, train_id).result["model"]
    predict = {"kind": "predict", "model": model, "inputs": [ROW]}
    for _ in range(5):  # warm: the model in the serving cache, the statements built
        _run(settings, _submit(settings, owner_id, predict))
    lone = []
    profiler = cProfile.Profile() if profile else None
    for _ in range(requests):
        job_id = _submit(settings, owner_id, predict)
        if profiler is not None:
            profiler.enable()
        lone.append(_run(settings, job_id))
        if profiler is not None:
            profiler.disable()
    batched = []
    for _ in range(batches):
        ids = [_submit(settings, owner_id, predict) for _ in range(batch_size)]
        cpu, wall = _run(settings, ids[0])
        batched.append((cpu / batch_size, wall / batch_size))
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    return {"lone_cpu_ms": statistics.median(c for c, _ in lone), "lone_wall_ms": statistics.median(w for _, w in lone),
            "batched_cpu_ms_per_job": statistics.median(c for c, _ in batched) if batched else float("nan"),
            "batched_wall_ms_per_job": statistics.median(w for _, w in batched) if batched else float("nan")}


def main() -> None:
    """Parse the arguments, build a private stack, measure, print."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-worker-cpu-") as tmp, Stack(Path(tmp), args.backend) as stack:
        settings = SETTINGS.with_overrides(database_url=stack.database_url, redis_url=stack.redis_url,
                                           storage_root=Path(tmp) / "storage", predict_max_delay_ms=0)
        figures = measure(settings, args.requests, args.batches, args.batch_size, args.profile)
    print(f"{args.backend}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
