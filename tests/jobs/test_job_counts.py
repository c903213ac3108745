"""Job counts: kept by triggers on ``jobs`` at every submit, transition and delete, equal to counting
every job, and read by the admin overview without counting jobs."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import case, delete, event, func, select, union_all, update

from app.accounts import create_user
from app.db import get_engine, session_scope
from app.jobs import attempts, overview, service, states
from app.jobs.schemas import parse_spec
from app.models import Attempt, Job, JobCount, JobEvent, User

SPEC = {"kind": "train", "name": "count-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
        "hyperparameters": {"epochs": 1}}


def mismatches(session) -> list[tuple]:
    """Every (state, kind, queue) whose kept count differs from counting the jobs, read in one
    statement (one snapshot, whatever other writers do meanwhile)."""
    counted = select(Job.state, Job.kind, Job.queue, func.count().label("n")).group_by(Job.state, Job.kind, Job.queue)
    kept = (select(JobCount.state, JobCount.kind, JobCount.queue, (-func.sum(JobCount.jobs)).label("n"))
            .group_by(JobCount.state, JobCount.kind, JobCount.queue))
    both = union_all(counted, kept).subquery()
    return list(session.execute(select(both.c.state, both.c.kind, both.c.queue, func.sum(both.c.n))
                                .group_by(both.c.state, both.c.kind, both.c.queue).having(func.sum(both.c.n) != 0)))


@pytest.fixture
def owner(settings):
    """A user of this test; their jobs (and the user) are removed afterwards, which the counts follow too."""
    with session_scope(settings.database_url, write=True) as s:
        user, _ = create_user(session=s, email=f"counts-{uuid.uuid4().hex[:10]}@example.com")
        user_id = user.id
    yield user_id
    with session_scope(settings.database_url, write=True) as s:
        ids = select(Job.id).where(Job.owner_id == user_id).scalar_subquery()
        s.execute(delete(Attempt).where(Attempt.job_id.in_(ids)))
        s.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
        s.execute(delete(Job).where(Job.owner_id == user_id))
    with session_scope(settings.database_url) as s:
        assert mismatches(s) == []


def test_counts_equal_counting_every_job_after_submits_transitions_bulk_moves_and_deletes(settings, owner):
    url = settings.database_url
    with session_scope(url, write=True) as s:
        user = s.get(User, owner)
        ids = [service.submit(session=s, owner=user, spec=parse_spec(SPEC), settings=settings).id for _ in range(6)]
    with session_scope(url) as s:
        assert mismatches(s) == []
        before = dict(s.execute(select(JobCount.state, func.sum(JobCount.jobs)).group_by(JobCount.state)).all())
    run, fail, cancel, pause, bulk_a, bulk_b = ids
    with session_scope(url, write=True) as s:
        assert attempts.claim(session=s, job_id=run, token=0, worker="w", host="h", pid=1, lease_seconds=600)
        assert attempts.claim(session=s, job_id=fail, token=0, worker="w", host="h", pid=1, lease_seconds=600)
    with session_scope(url, write=True) as s:
        attempts.finish(session=s, job_id=fail, token=1, to=states.FAILED, error_class="internal", message="boom")
        assert states.transition(s, cancel, to=states.CANCELLED, expect=states.QUEUED)
        assert states.transition(s, pause, to=states.PAUSED, expect=states.QUEUED)
        # A progress write (no state change) and a heartbeat leave the counts alone.
        s.execute(update(Job).where(Job.id == run).values(progress=0.5, epoch=1))
    with session_scope(url, write=True) as s:
        # Many jobs in one transaction, one compare-and-set each, and a job moved to another queue.
        moved = states.transition_all(s, [states.Move(job_id=j) for j in (bulk_a, bulk_b)],
                                      to=states.CANCELLED, expect=states.QUEUED)
        assert len(moved) == 2
        s.execute(update(Job).where(Job.id == pause).values(queue="default"))
    with session_scope(url) as s:
        assert mismatches(s) == []
        after = dict(s.execute(select(JobCount.state, func.sum(JobCount.jobs)).group_by(JobCount.state)).all())
        shown = overview.overview(session=s, settings=settings)
    delta = {state: int(after.get(state, 0)) - int(before.get(state, 0)) for state in states.STATES}
    assert delta["queued"] == -6 and delta["running"] == 1 and delta["failed"] == 1
    assert delta["cancelled"] == 3 and delta["paused"] == 1
    assert shown["jobs_by_state"] == {state: int(after.get(state, 0)) for state in states.STATES}
    with session_scope(url, write=True) as s:
        s.execute(delete(JobEvent).where(JobEvent.job_id == bulk_a))
        s.execute(delete(Job).where(Job.id == bulk_a))
    with session_scope(url) as s:
        assert mismatches(s) == []


def test_the_overview_counts_no_job(settings, owner):
    with session_scope(settings.database_url, write=True) as s:
        service.submit(session=s, owner=s.get(User, owner), spec=parse_spec(SPEC), settings=settings)
    seen: list[str] = []
    engine = get_engine(settings.database_url)

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        with session_scope(settings.database_url) as s:
            data = overview.overview(session=s, settings=settings)
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert data["jobs_by_state"]["queued"] >= 1
    assert next(q for q in data["queues"] if q["name"] == "train")["queued_jobs"] >= 1
    # Counting, grouping or summing happens over the kept counts only, never over the jobs.
    aggregates = [s for s in seen if "count(" in s.lower() or "group by" in s.lower()]
    assert aggregates and all("FROM jobs" not in s for s in aggregates), aggregates


def test_concurrent_transactions_over_many_jobs_never_deadlock_on_the_counters(settings, owner):
    """Writers that each change several jobs at once (as a micro-batch's claim, the reaper or a bulk
    cancel do), locking the jobs in one order, never wait on each other's counter rows: no
    transaction is aborted as a deadlock, and the counts and the list's version follow every commit."""
    import random
    import threading

    from sqlalchemy.exc import DBAPIError

    from app.models import JobListVersion

    url = settings.database_url
    with session_scope(url, write=True) as s:
        user = s.get(User, owner)
        ids = [service.submit(session=s, owner=user, spec=parse_spec(SPEC), settings=settings).id for _ in range(64)]
    version = select(func.sum(JobListVersion.version)).where(JobListVersion.owner_id == owner)
    with session_scope(url) as s:
        before = s.execute(version).scalar_one()
    threads, rounds = 6, 50
    committed: list[int] = []
    deadlocks: list[str] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(rounds):
            chosen = sorted(rng.sample(ids, 6))
            # A move between states, or a write of progress alone (which changes no count).
            values = {"progress": rng.random()}
            if rng.random() < 0.5:
                values["state"] = case((Job.state == "queued", "paused"), else_="queued")
            try:
                with session_scope(url, write=True) as s:
                    # The jobs' own rows are locked in id order, as Kiln's bulk writers do.
                    s.execute(select(Job.id).where(Job.id.in_(chosen)).order_by(Job.id).with_for_update())
                    s.execute(update(Job).where(Job.id.in_(chosen)).values(**values))
                committed.append(1)
            except DBAPIError as exc:
                if "deadlock" in str(exc).lower():
                    deadlocks.append(str(exc.orig))
                else:
                    raise

    workers = [threading.Thread(target=writer, args=(seed,)) for seed in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert deadlocks == [], f"{len(deadlocks)} of {threads * rounds} transactions were aborted: {deadlocks[:2]}"
    assert len(committed) == threads * rounds
    with session_scope(url) as s:
        assert mismatches(s) == []
        # Every committed transaction is a new version of the owner's job list.
        assert s.execute(version).scalar_one() - before >= threads * rounds
