"""Usage totals: kept where jobs are submitted and attempts claimed and ended, equal to summing every
attempt (the dashboard's old query), and read in statements that do not grow with the history."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, func, literal, select, text

from app.accounts import create_user
from app.jobs import attempts, overview, recovery, service, states
from app.jobs.schemas import parse_spec
from app.models import Attempt, Job, User, utcnow
from app.usage import Tally, report

SPEC = {"kind": "train", "name": "usage-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
        "hyperparameters": {"epochs": 1}}
# Timestamps on whole milliseconds and durations on tenths of a second: SQLite's julianday() reads
# milliseconds, so the old query and the totals add up the very same numbers.
T0 = datetime(2031, 3, 4, 5, 6, 7, 250_000, tzinfo=timezone.utc)


def recount(session, now: datetime, user_ids: list[int]) -> dict[int, tuple[int, int, float]]:
    """Today's definition, as the dashboard computed it before the totals: per user, jobs, attempts and
    the sum over every attempt of ``coalesce(ended_at, now) - started_at`` in SQL."""
    ended = func.coalesce(Attempt.ended_at, literal(now, type_=Attempt.ended_at.type))
    if session.get_bind().dialect.name == "sqlite":
        seconds = (func.julianday(ended) - func.julianday(Attempt.started_at)) * 86400.0
    else:
        seconds = func.extract("epoch", ended - Attempt.started_at)
    compute = dict((owner, (n, s)) for owner, s, n in session.execute(
        select(Job.owner_id, func.sum(seconds), func.count(Attempt.id)).join(Attempt, Attempt.job_id == Job.id)
        .where(Job.owner_id.in_(user_ids)).group_by(Job.owner_id)))
    jobs = dict(session.execute(select(Job.owner_id, func.count()).where(Job.owner_id.in_(user_ids))
                                .group_by(Job.owner_id)).all())
    return {uid: (jobs[uid], compute.get(uid, (0, 0.0))[0], round(float(compute.get(uid, (0, 0.0))[1] or 0.0), 1))
            for uid in jobs}


class Clock:
    """The time the services read (claim's start, finish's end), moved by the test."""

    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def seconds(self, s: float) -> datetime:
        """Set the clock to ``T0 + s`` and return it."""
        self.at = T0 + timedelta(seconds=s)
        return self.at


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(attempts, "utcnow", c)  # claim() and finish() read it
    return c


def _user(session) -> User:
    user, _ = create_user(session=session, email=f"usage-{uuid.uuid4().hex[:10]}@example.com")
    session.flush()
    return user


def _submit(session, user: User, settings) -> int:
    return service.submit(session=session, owner=user, spec=parse_spec(SPEC), settings=settings).id


def _claim(session, job_id: int, token: int, device: str) -> None:
    assert attempts.claim(session=session, job_id=job_id, token=token, worker="w", host="h", pid=1,
                          lease_seconds=3600, device=device) is not None


def test_the_totals_equal_the_sum_over_every_attempt_after_finished_failed_retried_and_running_ones(
        session, settings, clock):
    ada, bob = _user(session), _user(session)
    done, retried, running = (_submit(session, ada, settings) for _ in range(3))
    lost, requeued, waiting = (_submit(session, bob, settings) for _ in range(3))

    clock.seconds(0)
    _claim(session, done, 0, "cpu")
    clock.seconds(100.3)
    attempts.finish(session=session, job_id=done, token=1, to=states.SUCCEEDED)  # cpu 100.3

    clock.seconds(10)
    _claim(session, retried, 0, "cuda")
    job = session.get(Job, retried, populate_existing=True)
    assert recovery.requeue_or_fail(session=session, job=job, error_class="oom", message="out of memory",
                                    now=T0 + timedelta(seconds=52.6)) == states.QUEUED  # gpu 42.6, retried
    clock.seconds(60)
    _claim(session, retried, 1, "cpu")
    clock.seconds(75.1)
    attempts.finish(session=session, job_id=retried, token=2, to=states.FAILED, error_class="internal",
                    message="boom")  # cpu 15.1

    clock.seconds(80)
    _claim(session, running, 0, "cuda")  # gpu, still running: 120 s at T0 + 200

    clock.seconds(5)
    _claim(session, lost, 0, "cpu")
    clock.seconds(20)
    _claim(session, requeued, 0, "cuda")
    # The reaper's way: both attempts end in one transaction, their time applied after both jobs.
    tally = Tally()
    for job_id, ended in ((lost, 7.7), (requeued, 33.3)):
        job = session.get(Job, job_id, populate_existing=True)
        recovery.requeue_or_fail(session=session, job=job, error_class="worker_lost", message="gone",
                                 now=T0 + timedelta(seconds=ended), retryable=job_id != lost, tally=tally)
    tally.apply(session=session)  # bob: cpu 2.7 (failed), gpu 13.3 (queued again)
    assert session.get(Job, waiting).state == states.QUEUED  # never started: a job, no attempt

    now = T0 + timedelta(seconds=200)
    shown = {u["user_id"]: u for u in overview.usage(session=session, now=now) if u["user_id"] in (ada.id, bob.id)}
    expected = recount(session, now, [ada.id, bob.id])
    assert {uid: (u["jobs"], u["attempts"], u["compute_seconds"]) for uid, u in shown.items()} == expected
    assert expected[ada.id][:2] == (3, 4) and expected[bob.id][:2] == (3, 2)
    # CPU and GPU apart, as the usage API (its own Python sum over the same attempts) counts them.
    for user in (ada, bob):
        api = report(session=session, actor=user, start=None, end=now)["users"][0]
        assert (shown[user.id]["cpu_seconds"], shown[user.id]["gpu_seconds"]) == (
            round(api["cpu_seconds"], 1), round(api["gpu_seconds"], 1))
    assert shown[ada.id]["gpu_seconds"] > 0 and shown[ada.id]["cpu_seconds"] > 0
    # Busiest first.
    order = [u["user_id"] for u in overview.usage(session=session, now=now) if u["user_id"] in (ada.id, bob.id)]
    assert order == [ada.id, bob.id]


def test_an_attempt_ended_twice_counts_once(session, settings, clock):
    user = _user(session)
    job_id = _submit(session, user, settings)
    _claim(session, job_id, 0, "cpu")
    for _ in range(2):  # the second finds the attempt ended and adds nothing
        attempts.end_attempt(session=session, job_id=job_id, owner_id=user.id, token=1, outcome="x",
                             at=T0 + timedelta(seconds=12.5))
    row = next(u for u in overview.usage(session=session, now=T0 + timedelta(seconds=99)) if u["user_id"] == user.id)
    assert row["compute_seconds"] == 12.5 == recount(session, T0, [user.id])[user.id][2]


def _overview_statements(session, settings) -> list[tuple[str, object]]:
    """The statements (with parameters) one computation of the overview runs."""
    seen: list[tuple[str, object]] = []

    def on_execute(_conn, _cursor, statement, parameters, _context, _many):
        seen.append((statement, parameters))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        overview.overview(session=session, settings=settings)
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    return seen


def _attempt_reads(session, statements: list[tuple[str, object]]) -> list[str]:
    """How each statement's query plan reads ``job_attempts``: the index it uses, or ``all rows``.
    PostgreSQL plans with sequential scans off, so a small test table is read as a long history would be."""
    pg = session.get_bind().dialect.name == "postgresql"
    if pg:
        patterns = [(r"Seq Scan on job_attempts", None), (r"Scan using (\S+) on job_attempts", 1),
                    (r"Bitmap Index Scan on ((?:ix|uq)_job_attempts\S*)", 1)]
    else:
        patterns = [(r"SCAN job_attempts$", None), (r"(?:SCAN|SEARCH) job_attempts USING (?:COVERING )?INDEX (\S+)", 1)]
    reads = []
    with session.get_bind().connect() as conn:
        if pg:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in statements:
            plan = conn.exec_driver_sql(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + statement, parameters).all()
            for line in (str(row[-1]).strip() for row in plan):
                for pattern, group in patterns:
                    if match := re.search(pattern, line):
                        reads.append(match.group(group) if group else "all rows")
    return reads


def test_the_overview_reads_only_the_open_attempts_however_long_the_history(session, settings, clock):
    user = _user(session)
    job_id = _submit(session, user, settings)
    _claim(session, job_id, 0, "cpu")
    session.commit()  # the plans are read on another connection
    try:
        before = _overview_statements(session, settings)
        # A long history: 300 more jobs of this user, each with an attempt that ended.
        for i in range(300):
            other = _submit(session, user, settings)
            clock.seconds(i)
            _claim(session, other, 0, "cuda" if i % 2 else "cpu")
            clock.seconds(i + 0.5)
            attempts.finish(session=session, job_id=other, token=1, to=states.SUCCEEDED)
        session.commit()
        after = _overview_statements(session, settings)
        assert len(after) == len(before)  # as many statements as with one attempt
        reads = _attempt_reads(session, after)  # the open attempts (workers, running time), by their index
        assert reads and set(reads) == {"ix_job_attempts_open"}, reads
    finally:
        ids = select(Job.id).where(Job.owner_id == user.id)
        session.execute(Attempt.__table__.delete().where(Attempt.job_id.in_(ids)))
        session.execute(text("DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE owner_id = :u)"),
                        {"u": user.id})
        session.execute(Job.__table__.delete().where(Job.owner_id == user.id))
        session.commit()


def test_one_users_submits_spread_over_shards_and_the_dashboard_sums_them(session, settings, clock):
    """Submits write their job id's shard (so concurrent ones of one user do not queue on one row's
    lock); the dashboard shows the sum of the user's rows, attempts (shard 0) included."""
    from app.models import UsageTotal
    from app.usage import SHARDS

    user = _user(session)
    ids = [_submit(session, user, settings) for _ in range(SHARDS + 3)]
    _claim(session, ids[0], 0, "cpu")
    rows = dict(session.execute(select(UsageTotal.shard, UsageTotal.jobs).where(UsageTotal.user_id == user.id)).all())
    assert len(rows) == SHARDS and sum(rows.values()) == len(ids)
    assert rows == {s: sum(1 for i in ids if i % SHARDS == s) for s in range(SHARDS)}
    shown = [u for u in overview.usage(session=session, now=T0 + timedelta(seconds=5)) if u["user_id"] == user.id]
    assert [(u["jobs"], u["attempts"]) for u in shown] == [(len(ids), 1)]
    assert shown[0]["cpu_seconds"] == 5.0  # the running attempt, added by the reader
