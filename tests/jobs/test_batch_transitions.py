"""A batch of jobs moves in one compare-and-set statement, and each row is still fenced by its own
token: a stale token in the batch is refused for its job alone, and the others move."""

from __future__ import annotations

from sqlalchemy import event

from app.accounts import create_user
from app.jobs import attempts
from app.models import Attempt, Job, JobEvent, UsageTotal


def _jobs(session, count: int, email: str) -> tuple[int, list[Job]]:
    user, _ = create_user(session=session, email=email)
    jobs = [Job(owner_id=user.id, kind="predict", name=f"j{i}", state="queued", queue="predict", spec={},
                max_attempts=3) for i in range(count)]
    session.add_all(jobs)
    session.flush()
    return user.id, jobs


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
        seen = []
        conn = session.connection()

        def on_execute(_conn, _cursor, statement, *_args):
            seen.append(statement)

        event.listen(conn.engine, "before_cursor_execute", on_execute)
        try:
            claimed = _claim(session, [(j.id, 0) for j in jobs])
            attempts.finish_many(session=session, to="succeeded", jobs=[
                (c.job_id, c.number, {"x": 1}, "done") for c in claimed])
        finally:
            event.remove(conn.engine, "before_cursor_execute", on_execute)
        counts.append(len(seen))
    # Not one statement per job: the claim's compare-and-set, events, attempts, totals; the finish's
    # compare-and-set, results (one executemany), events, attempt ends, totals.
    assert counts[0] == counts[1] <= 10, counts
