"""The control-plane figures, each measured for Kiln and for its bare baseline on one :class:`Stack`."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Job
from bench.noop_celery import RAN_KEY, TASK, make_celery
from bench.stack import Stack

LUA = Path(__file__).with_name("post_job.lua")
WRK_CONNECTIONS = 16
WARMUP_JOBS = 3
# The body every wrk request posts: a small training job (it stays queued; no train worker runs then).
WRK_SPEC = {"kind": "train", "name": "bench-wrk", "model": {"arch": "mlp", "hidden_sizes": [16]},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 1}}
MODEL_SPEC = {"kind": "train", "name": "bench-tiny", "model": {"arch": "mlp", "hidden_sizes": [16]},
              "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 1, "batch_size": 64}}
PREDICT_SPEC = {"kind": "predict", "model": "bench-tiny@latest", "inputs": [[0.0] * 64]}
TERMINAL = ("succeeded", "failed", "cancelled")


class Api:
    """A keep-alive HTTP client for one loopback server."""

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.token = token
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def submit(self, spec: dict) -> int:
        """POST a job spec; returns the new job's id (raises on anything but 201)."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            self._conn.request("POST", "/api/v1/jobs", body=json.dumps(spec), headers=headers)
            response = self._conn.getresponse()
        except (http.client.HTTPException, OSError):
            self._conn.close()  # a dropped keep-alive connection: one fresh try
            self._conn.request("POST", "/api/v1/jobs", body=json.dumps(spec), headers=headers)
            response = self._conn.getresponse()
        body = response.read()
        if response.status != 201:
            raise RuntimeError(f"POST /api/v1/jobs on port {self.port} answered {response.status}: {body[:500]!r}")
        return json.loads(body)["id"]


def user_token(stack: Stack) -> str:
    """A fresh user's API token in the stack's database."""
    from app.accounts import create_user

    with Session(stack.engine) as session:
        _, token = create_user(session=session, email=f"bench-{uuid.uuid4().hex[:8]}@example.com")
        session.commit()
    return token


def wait_jobs(stack: Stack, ids: list[int], timeout: float, poll: float) -> list[Job]:
    """Poll the rows until every job in ``ids`` is terminal; raise unless all succeeded."""
    deadline = time.monotonic() + timeout
    with Session(stack.engine) as session:
        while time.monotonic() < deadline:
            done = session.scalar(select(func.count()).where(Job.id.in_(ids), Job.state.in_(TERMINAL)))
            session.rollback()  # end the read so the next poll sees new commits
            if done == len(ids):
                break
            time.sleep(poll)
        else:
            raise RuntimeError(f"{len(ids) - done} of {len(ids)} jobs were not done after {timeout:.0f} s")
        jobs = list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))
        session.expunge_all()
    failed = [(j.id, j.state, j.error_message) for j in jobs if j.state != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[:3]}")
    return jobs


def train_model(stack: Stack, api: Api) -> None:
    """Train the tiny model the prediction jobs use, on a train worker stopped afterwards."""
    workers = stack.kiln_workers("train", 1)
    try:
        wait_jobs(stack, [api.submit(MODEL_SPEC)], timeout=600, poll=0.2)
    finally:
        stack.stop(workers)


def wrk_rate(port: int, token: str, seconds: int) -> tuple[float, int]:
    """``POST /api/v1/jobs`` under wrk for ``seconds``: 2xx answers per second, and the failed requests."""
    env = dict(os.environ, BENCH_BODY=json.dumps(WRK_SPEC), BENCH_TOKEN=token)
    out = subprocess.run(
        ["wrk", "--threads", "2", "--connections", str(WRK_CONNECTIONS), "--duration", f"{seconds}s",
         "--timeout", "10s", "--script", str(LUA), f"http://127.0.0.1:{port}/api/v1/jobs"],
        env=env, capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    duration = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    failed += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return (int(total.group(1)) - (int(non_2xx.group(1)) if non_2xx else 0)) / duration, failed


def kiln_submit_to_running(stack: Stack, api: Api, count: int) -> list[float]:
    """Milliseconds from a job's row being created to its claim (``started_at``), one warm predict worker."""
    workers = stack.kiln_workers("predict", 1)
    samples = []
    try:
        for i in range(WARMUP_JOBS + count):
            # One job at a time, each done before the next: the worker is idle and warm when it arrives.
            job = wait_jobs(stack, [api.submit(PREDICT_SPEC)], timeout=120, poll=0.01)[0]
            if i >= WARMUP_JOBS:
                samples.append((job.started_at - job.created_at).total_seconds() * 1000)
    finally:
        stack.stop(workers)
    return samples


def celery_round_trip(stack: Stack, count: int) -> list[float]:
    """Milliseconds from ``send_task`` to a raw Celery no-op task running, one warm worker."""
    client, broker = make_celery(stack.redis_url), redis.Redis.from_url(stack.redis_url)
    workers = stack.celery_workers(1)
    samples = []
    try:
        broker.delete(RAN_KEY)
        for i in range(WARMUP_JOBS + count):
            client.send_task(TASK, args=[time.time()])
            item = broker.blpop([RAN_KEY], timeout=120)
            if item is None:
                raise RuntimeError("a no-op task did not run within 120 s")
            sent_at, ran_at = json.loads(item[1])
            if i >= WARMUP_JOBS:
                samples.append((ran_at - sent_at) * 1000)
    finally:
        stack.stop(workers)
        broker.close()
    return samples


def kiln_drain(stack: Stack, api: Api, count: int) -> float:
    """Prediction jobs per second: ``count`` queued with no worker, then drained by 2 ``kiln worker`` processes,
    from the first claim to the last finish."""
    ids = [api.submit(PREDICT_SPEC) for _ in range(count)]
    workers = stack.kiln_workers("predict", 2)
    try:
        jobs = wait_jobs(stack, ids, timeout=120 + count, poll=0.2)
    finally:
        stack.stop(workers)
    # From the first claim, not the first finish: a micro-batch finishes its jobs in one transaction,
    # at one instant, so finish times alone would leave the first batch's work out of the span.
    return _rate([j.finished_at.timestamp() for j in jobs], start=min(j.started_at.timestamp() for j in jobs))


def celery_drain(stack: Stack, count: int) -> float:
    """No-op tasks per second: ``count`` published with no worker, then drained by 2 raw Celery workers."""
    client, broker = make_celery(stack.redis_url), redis.Redis.from_url(stack.redis_url)
    try:
        broker.delete(RAN_KEY)
        for _ in range(count):
            client.send_task(TASK, args=[time.time()])
        workers = stack.celery_workers(2)
        try:
            deadline = time.monotonic() + 120 + count
            while broker.llen(RAN_KEY) < count and time.monotonic() < deadline:
                time.sleep(0.2)
            ran = [json.loads(item)[1] for item in broker.lrange(RAN_KEY, 0, -1)]
        finally:
            stack.stop(workers)
    finally:
        broker.close()
    if len(ran) < count:
        raise RuntimeError(f"only {len(ran)} of {count} no-op tasks ran")
    return _rate(ran)


def _rate(finish_times: list[float], start: float | None = None) -> float:
    """Completions per second from ``start`` (default: the first completion) to the last completion;
    worker start-up is not counted."""
    span = max(finish_times) - (min(finish_times) if start is None else start)
    return (len(finish_times) - 1) / span if span > 0 else float("inf")
