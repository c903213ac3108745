"""A fresh, migrated database filled fast with many jobs and metric rows, for the poll benchmark."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from sqlalchemy import create_engine, text

from app.accounts import create_user
from app.db import get_engine, session_scope
from app.jobs import metric_curves
from app.migrate import upgrade

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BATCH = 20_000
# The busy user owns this share of the jobs; the other user the rest.
BUSY_SHARE = 0.9
TARGET_STEPS = 20_000
TARGET_EPOCHS = 200
OTHER_REPORTS_PER_JOB = 200
SPEC = {"kind": "train", "name": "sunspots-lstm",
        "model": {"arch": "lstm", "hidden_size": 64, "num_layers": 2, "dropout": 0.1},
        "dataset": {"id": "builtin:sunspots", "target": "SUNACTIVITY", "window": 24},
        "hyperparameters": {"epochs": 200, "batch_size": 64, "learning_rate": 0.001, "optimizer": "adamw",
                            "scheduler": "cosine", "seed": 0},
        "resources": {"device": "auto", "gpus": 1}, "checkpoint": {"every_epochs": 1, "keep_last": 3},
        "priority": "normal", "max_runtime_s": 3600, "metadata": {"team": "forecasting"}}
PREDICT_SPEC = {"kind": "predict", "model": "sunspots-lstm@latest", "inputs": [[0.1] * 24], "explain": False}
JOB_COLUMNS = ("id", "owner_id", "kind", "name", "state", "queue", "priority", "spec", "attempts", "max_attempts",
               "lease_owner", "lease_expires_at", "progress", "epoch", "step", "result", "error_class",
               "error_message", "created_at", "queued_at", "published_at", "started_at", "finished_at",
               "updated_at")
METRIC_COLUMNS = ("id", "job_id", "attempt", "scope", "epoch", "step", "values", "at")


@dataclass
class PollData:
    """What the benchmark needs to know about the database it polls."""

    backend: str
    url: str
    token: str  # the busy user's bearer token
    other_token: str
    user_id: int
    target_job: int  # a running training job with TARGET_STEPS step and TARGET_EPOCHS epoch reports
    deep_cursor: int  # a list cursor near the busy user's oldest jobs
    jobs: int
    metrics: int


@contextmanager
def database(backend: str, jobs: int, metrics: int, say=print) -> Iterator[PollData]:
    """A fresh database on ``backend`` filled with ``jobs`` jobs and ``metrics`` metric rows; removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="kiln-polls-"))
    name = f"kiln_polls_{uuid.uuid4().hex[:10]}"
    if backend == "postgresql":
        url = _admin(f'CREATE DATABASE "{name}"')
    else:
        url = f"sqlite:///{tmp / 'kiln.db'}"
    try:
        upgrade(url)
        with session_scope(url, write=True) as session:
            busy, token = create_user(session=session, email="busy@example.com")
            other, other_token = create_user(session=session, email="other@example.com")
            ids = (busy.id, other.id)
        data = PollData(backend, url, token, other_token, ids[0], target_job=0, deep_cursor=0, jobs=jobs,
                        metrics=metrics)
        started = time.monotonic()
        fill(data, ids)
        say(f"filled: {jobs} jobs, {metrics} metric rows, target job {data.target_job} "
            f"({time.monotonic() - started:.0f} s)")
        yield data
    finally:
        engine = get_engine(url)
        engine.dispose()
        if backend == "postgresql":
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)


def _admin(statement: str) -> str:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(statement))
    engine.dispose()
    name = statement.split('"')[1]
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def fill(data: PollData, owners: tuple[int, int]) -> None:
    """Insert the jobs, the metric rows, and the target job's checkpoints and attempts in one transaction,
    then fold each job's reports into its curves."""
    rng = random.Random(0)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(days=60)
    busy, other = owners
    n = data.jobs
    jobs, trained = [], []
    for i in range(1, n + 1):
        owner = busy if rng.random() < BUSY_SHARE else other
        created = start + timedelta(days=59) * (i / n)
        age = (n - i) / n
        jobs.append(_job(rng, i, owner, created, age, now))
        if jobs[-1][2] == "train" and jobs[-1][4] in ("succeeded", "failed", "running"):
            trained.append(i)
    # The target: the busy user's newest running training job, polled by the dashboard.
    target = next(j[0] for j in reversed(jobs) if j[1] == busy and j[2] == "train" and j[4] == "running")
    data.target_job = target
    busy_ids = [j[0] for j in jobs if j[1] == busy]
    data.deep_cursor = busy_ids[len(busy_ids) // 20]  # 95% of the way down the list
    others = [j for j in trained if j != target]
    per_job = OTHER_REPORTS_PER_JOB
    rest = max(0, data.metrics - TARGET_STEPS - TARGET_EPOCHS)
    others = others[: rest // per_job] if rest else []
    writer = _Writer(data.url)
    try:
        writer.rows("jobs", JOB_COLUMNS, jobs)
        writer.rows("metrics", METRIC_COLUMNS, _metrics(rng, target, others, per_job, rest, start))
        writer.rows("checkpoints", ("id", "job_id", "attempt", "epoch", "step", "path", "size_bytes", "sha256",
                                    "metric_name", "metric_value", "is_best", "reason", "created_at"),
                    [(k + 1, target, 2, 197 + k, (197 + k) * 100, f"checkpoints/{target}/epoch-{197 + k}.safetensors",
                      4_194_304, "ab" * 32, "val_loss", 0.03 - k * 0.001, k == 2, "periodic", now)
                     for k in range(3)])
        writer.rows("job_attempts", ("id", "job_id", "number", "worker", "host", "pid", "started_at", "ended_at",
                                     "start_epoch", "start_step", "outcome"),
                    [(1, target, 1, "gpu-0@node-1", "node-1", 4242, now - timedelta(hours=6), now - timedelta(hours=3),
                      0, 0, "worker_lost"),
                     (2, target, 2, "gpu-1@node-2", "node-2", 4343, now - timedelta(hours=3), None, 101, 10_100, None)])
        # The usage totals the services would have kept: jobs per owner, and the target's two attempts
        # (the ended one's 3 h on CPU; the running one is added by readers).
        per_owner = {owner: [0, 0, 0.0] for owner in owners}
        for job in jobs:
            per_owner[job[1]][0] += 1
        per_owner[next(j[1] for j in jobs if j[0] == target)][1:] = [2, 3 * 3600.0]
        writer.rows("usage_totals", ("user_id", "jobs", "attempts", "cpu_seconds", "gpu_seconds"),
                    [(owner, n, tries, cpu, 0.0) for owner, (n, tries, cpu) in per_owner.items()])
        writer.finish()
    finally:
        writer.close()
    # Each job's curves, as the recorder folds them when it stores reports (one transaction).
    with session_scope(data.url, write=True) as session:
        for job_id in [target, *others]:
            metric_curves.fold(session=session, job_id=job_id)
    _settle(data.url)


def _job(rng: random.Random, i: int, owner: int, created: datetime, age: float, now: datetime) -> tuple:
    kind = "train" if rng.random() < 0.6 else "predict"
    if age < 0.001:
        state = rng.choice(("queued", "running", "running", "paused"))
    else:
        state = rng.choices(("succeeded", "failed", "cancelled"), weights=(75, 15, 10))[0]
    spec = dict(SPEC, name=f"sunspots-lstm-{i}") if kind == "train" else PREDICT_SPEC
    started = created + timedelta(seconds=5) if state != "queued" else None
    finished = started + timedelta(minutes=30) if state in ("succeeded", "failed", "cancelled") else None
    epochs = 200 if kind == "train" else 0
    epoch = {"succeeded": epochs, "queued": 0}.get(state, rng.randrange(epochs + 1) if epochs else 0)
    result = ({"best_val_loss": rng.random(), "epochs": epochs} if kind == "train" else {"outputs": [[rng.random()]]}
              ) if state == "succeeded" else None
    failed = state == "failed"
    lease = state == "running"
    return (i, owner, kind, spec["name"] if kind == "train" else f"predict-{i}", state,
            "train" if kind == "train" else "predict", "normal", orjson.dumps(spec).decode(),
            0 if state == "queued" else 1 + (rng.random() < 0.05), 3,
            "gpu-0@node-1" if lease else None, now + timedelta(seconds=60) if lease else None,
            epoch / epochs if epochs else (1.0 if state == "succeeded" else 0.0), epoch, epoch * 100,
            orjson.dumps(result).decode() if result else None,
            "oom" if failed else None, "CUDA out of memory: lower batch_size" if failed else None,
            created, created, created, started, finished, finished or (now if lease else created))


def _metrics(rng: random.Random, target: int, others: Sequence[int], per_job: int, rest: int,
             start: datetime) -> Iterator[tuple]:
    # Interleaved the way a live system writes them: each round, the target job reports its next
    # hundred steps and one epoch while a slice of the other jobs write their whole series, so the
    # target's rows are scattered over the table rather than packed together.
    rounds = TARGET_EPOCHS
    steps_per_round = TARGET_STEPS // rounds
    metric_id = 0
    written_rest = 0
    for r in range(rounds):
        at = start + timedelta(minutes=r)
        for s in range(r * steps_per_round, (r + 1) * steps_per_round):
            metric_id += 1
            loss = 2.0 / (1 + s / 500) + rng.random() * 0.05
            yield (metric_id, target, 2 if r > 100 else 1, "step", r, s,
                   orjson.dumps({"loss": loss, "lr": 0.001 * (1 - s / TARGET_STEPS), "grad_norm": rng.random()}).decode(),
                   at)
        metric_id += 1
        yield (metric_id, target, 2 if r > 100 else 1, "epoch", r, (r + 1) * steps_per_round,
               orjson.dumps({"train_loss": 1 / (r + 1), "val_loss": 1.1 / (r + 1) + rng.random() * 0.01,
                             "val_accuracy": 1 - 1 / (r + 2)}).decode(), at)
        lo, hi = r * len(others) // rounds, (r + 1) * len(others) // rounds
        for job in others[lo:hi]:
            for k in range(per_job):
                if written_rest >= rest:
                    break
                written_rest += 1
                metric_id += 1
                scope = "epoch" if k % 10 == 9 else "step"
                values = ({"train_loss": rng.random(), "val_loss": rng.random(), "val_accuracy": rng.random()}
                          if scope == "epoch" else {"loss": rng.random(), "lr": 0.001, "grad_norm": rng.random()})
                yield (metric_id, job, 1, scope, k // 10, k * 10, orjson.dumps(values).decode(), at)


class _Writer:
    """Bulk rows straight through the driver in one transaction: COPY on PostgreSQL, executemany on SQLite."""

    def __init__(self, url: str):
        self.engine = get_engine(url)
        self.pg = self.engine.dialect.name == "postgresql"
        self.raw = self.engine.raw_connection()

    def rows(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        """Write ``rows`` (tuples in ``columns`` order; JSON columns already encoded)."""
        quoted = ", ".join(f'"{c}"' for c in columns)
        if self.pg:
            with self.raw.driver_connection.cursor().copy(f"COPY {table} ({quoted}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        # SQLite stores timestamps as naive UTC text, the way Kiln's UTCDateTime writes them.
        sql = f"INSERT INTO {table} ({quoted}) VALUES ({', '.join('?' * len(columns))})"
        cursor = self.raw.cursor()
        batch: list[tuple] = []
        for row in rows:
            batch.append(tuple(_sqlite_value(v) for v in row))
            if len(batch) >= BATCH:
                cursor.executemany(sql, batch)
                batch.clear()
        if batch:
            cursor.executemany(sql, batch)

    def finish(self) -> None:
        """Commit, and on PostgreSQL move the id sequences past the inserted ids."""
        if self.pg:
            cursor = self.raw.cursor()
            for table in ("jobs", "metrics", "checkpoints", "job_attempts"):
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"(SELECT coalesce(max(id), 1) FROM {table}))")
        self.raw.commit()

    def close(self) -> None:
        """Give the connection back (rolling back anything unfinished)."""
        self.raw.close()


def _settle(url: str) -> None:
    """On PostgreSQL, VACUUM ANALYZE: what autovacuum does after such a load (the planner's statistics,
    and the dead versions of the job-list counters that the load's 100,000 inserts each bumped).
    SQLite is left as Kiln leaves it, without ANALYZE."""
    engine = get_engine(url)
    if engine.dialect.name != "postgresql":
        return
    raw = engine.raw_connection()
    try:
        raw.driver_connection.autocommit = True
        raw.cursor().execute("VACUUM ANALYZE")
        raw.driver_connection.autocommit = False
    finally:
        raw.close()


def _sqlite_value(value):
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
