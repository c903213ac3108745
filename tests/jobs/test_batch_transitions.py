"""A batch of jobs moves in one compare-and-set statement, and each row is still fenced by its own
token: a stale token in the batch is refused for its job alone, and the others move."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event

from app.accounts import create_user
from app.jobs import attempts
from app.models import Attempt, Job, JobEvent, UsageTotal, utcnow


def _jobs(session, count: int, email: str) -> tuple[int, list[Job]]:
    user, _ = create_user(session=session, email=email)
    jobs = [Job(owner_id=user.id, kind="predict", name=f"j{i}", state="queued", queue="predict", spec={},
                max_attempts=3) for i in range(count)]
    session.add_all(jobs)
    session.flush()
    return user.id, jobs


@contextmanager
def _statements(session):
    """The SQL statements the session's engine sends while the block runs, in order."""
    seen: list[str] = []

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement)

    engine = session.connection().engine
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


def _claim(session, jobs: list[tuple[int, int]]):
    return attempts.claim_many(session=session, jobs=jobs, worker="w", host="h", pid=7, lease_seconds=60,
                               device="cpu")


def test_a_stale_token_in_a_batch_claim_is_refused_for_that_job_only(session):
    owner_id, jobs = _jobs(session, 4, "batch-claim@example.com")
    claimed = _claim(session, [(j.id, 1 if i == 2 else 0) for i, j in enumerate(jobs)])  # the third: stale
    assert [(c.job_id, c.number) for c in claimed] == [(j.id, 1) for i, j in enumerate(jobs) if i != 2]
    for i, job in enumerate(jobs):
        session.refresh(job)
        if i == 2:
            assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
        else:
            assert (job.state, job.attempts, job.lease_owner) == ("running", 1, "w:7:1")
    rows = session.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs])).all()
    assert sorted(a.job_id for a in rows) == sorted(c.job_id for c in claimed)
    assert session.query(UsageTotal).filter_by(user_id=owner_id).one().attempts == 3


def test_a_stale_token_in_a_batch_finish_is_refused_for_that_job_only(session):
    _, jobs = _jobs(session, 4, "batch-finish@example.com")
    _claim(session, [(j.id, 0) for j in jobs])
    # The second job's attempt lost its lease and a newer attempt took it meanwhile (token 2).
    session.query(Job).filter_by(id=jobs[1].id).update({"attempts": 2})
    ended = attempts.finish_many(session=session, to="succeeded", jobs=[
        (j.id, 1, {"predictions": [i]}, f"done {i}") for i, j in enumerate(jobs)])
    assert ended == [jobs[0].id, jobs[2].id, jobs[3].id]
    for i, job in enumerate(jobs):
        session.refresh(job)
        if i == 1:  # nothing of the stale attempt's finish reached its job
            assert (job.state, job.attempts, job.result) == ("running", 2, None)
        else:
            assert (job.state, job.result, job.lease_owner) == ("succeeded", {"predictions": [i]}, None)
    events = session.query(JobEvent).filter(JobEvent.job_id.in_([j.id for j in jobs]),
                                            JobEvent.to_state == "succeeded").all()
    assert sorted((e.job_id, e.message) for e in events) == sorted((j.id, f"done {i}") for i, j in enumerate(jobs)
                                                                   if i != 1)
    ended_attempts = {a.job_id: a.outcome for a in session.query(Attempt).filter(
        Attempt.job_id.in_([j.id for j in jobs]))}
    assert ended_attempts == {jobs[0].id: "succeeded", jobs[1].id: None, jobs[2].id: "succeeded",
                              jobs[3].id: "succeeded"}


def test_a_batch_claim_and_finish_cost_the_same_statements_whatever_the_batch_size(session):
    counts = []
    for size in (2, 16):
        _, jobs = _jobs(session, size, f"batch-size-{size}@example.com")
        with _statements(session) as seen:
            claimed = _claim(session, [(j.id, 0) for j in jobs])
            attempts.finish_many(session=session, to="succeeded", jobs=[
                (c.job_id, c.number, {"x": 1}, "done") for c in claimed])
        counts.append(len(seen))
    # Not one statement per job: the claim's compare-and-set, events, attempts, totals; the finish's
    # compare-and-set, results (one executemany), events, attempt ends, totals.
    assert counts[0] == counts[1] <= 10, counts


def test_each_job_of_a_batch_finish_gets_its_own_values_and_events_in_order(session):
    _, jobs = _jobs(session, 3, "batch-own@example.com")
    claimed = _claim(session, [(j.id, 0) for j in jobs])
    batched = {c.job_id: {"kind": "batched", "message": f"batch {c.job_id}", "data": {"n": c.job_id}}
               for c in claimed}
    # The middle job has no result of its own: it keeps the one it had (none), the others get theirs.
    ended = attempts.finish_many(session=session, to="succeeded", also=batched, jobs=[
        (c.job_id, c.number, None if i == 1 else {"y": [i, "é"]}, f"done {i}") for i, c in enumerate(claimed)])
    assert ended == [j.id for j in jobs]
    for i, job in enumerate(jobs):
        session.refresh(job)
        assert (job.state, job.result, job.progress) == ("succeeded", None if i == 1 else {"y": [i, "é"]}, 1.0)
        events = session.query(JobEvent).filter_by(job_id=job.id).order_by(JobEvent.id).all()
        assert [(e.kind, e.to_state, e.attempt, e.message, e.data) for e in events[-2:]] == [
            ("state", "succeeded", 1, f"done {i}", None), ("batched", None, 1, f"batch {job.id}", {"n": job.id})]


def test_each_job_of_a_batch_failure_gets_its_own_message_and_attempt_end(session):
    owner_id, jobs = _jobs(session, 3, "batch-fail@example.com")
    _claim(session, [(j.id, 0) for j in jobs])
    # The attempts started ten seconds ago: each ended one counts its own run time once.
    session.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs])).update(
        {"started_at": utcnow() - timedelta(seconds=10)})
    session.query(Job).filter_by(id=jobs[2].id).update({"attempts": 5})  # a newer attempt took it
    ended = attempts.finish_many(session=session, to="failed", error_class="user_error", jobs=[
        (j.id, 1, None, f"bad input {i}") for i, j in enumerate(jobs)])
    assert ended == [jobs[0].id, jobs[1].id]
    for i, job in enumerate(jobs[:2]):
        session.refresh(job)
        assert (job.state, job.error_class, job.error_message) == ("failed", "user_error", f"bad input {i}")
    session.refresh(jobs[2])
    assert (jobs[2].state, jobs[2].error_message) == ("running", None)
    outcomes = {a.job_id: a.outcome for a in session.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs]))}
    assert outcomes == {jobs[0].id: "user_error", jobs[1].id: "user_error", jobs[2].id: None}
    totals = session.query(UsageTotal).filter_by(user_id=owner_id).one()
    assert 20 <= totals.cpu_seconds < 60 and totals.gpu_seconds == 0 and totals.attempts == 3


def test_on_postgresql_a_batch_claim_and_finish_are_one_round_trip_each(session):
    if session.connection().dialect.name != "postgresql":
        pytest.skip("data-modifying CTEs are PostgreSQL's; SQLite keeps a statement per step")
    _, jobs = _jobs(session, 8, "batch-one@example.com")
    with _statements(session) as seen:
        claimed = _claim(session, [(j.id, 0) for j in jobs])
        claim_statements = len(seen)
        attempts.finish_many(session=session, to="succeeded", jobs=[(c.job_id, c.number, {"i": c.job_id}, "done")
                                                                    for c in claimed])
    # The claim: its compare-and-set with the events, attempt rows and usage count; the finish: its
    # compare-and-set with the results, events, attempt ends and usage time.
    assert (claim_statements, len(seen) - claim_statements) == (1, 1), seen
    assert len(claimed) == 8 and session.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs]),
                                                               Attempt.outcome == "succeeded").count() == 8
    for job in jobs:
        session.refresh(job)
        assert job.result == {"i": job.id}
