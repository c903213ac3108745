"""The state machine: allowed transitions, compare-and-set, events."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from app.accounts import create_user
from app.db import session_factory
from app.jobs import states
from app.models import Job, JobEvent


def _job(session, state="queued") -> Job:
    user, _ = create_user(session=session, email=f"s{id(session)}-{state}@example.com")
    job = Job(owner_id=user.id, kind="train", name="j", state=state, queue="train", spec={})
    session.add(job)
    session.flush()
    return job


def test_transition_writes_state_and_records_timestamped_event(session):
    job = _job(session)
    assert states.transition(session, job.id, to=states.RUNNING, expect=states.QUEUED, values={"attempts": 1})
    session.refresh(job)
    assert job.state == "running" and job.attempts == 1
    event = session.execute(select(JobEvent).where(JobEvent.job_id == job.id)).scalar_one()
    assert (event.from_state, event.to_state, event.attempt) == ("queued", "running", 1)
    assert event.at is not None and event.at.tzinfo is not None


def test_a_writer_that_finds_the_job_moved_changes_nothing(session):
    job = _job(session)
    assert states.transition(session, job.id, to=states.RUNNING, expect=states.QUEUED)
    # A second claim of the same queued job finds it running and changes nothing.
    assert not states.transition(session, job.id, to=states.RUNNING, expect=states.QUEUED)
    assert len(session.execute(select(JobEvent).where(JobEvent.job_id == job.id)).scalars().all()) == 1


def test_of_two_writers_that_both_saw_the_job_queued_exactly_one_wins(settings):
    """Two connections read the job as queued, then both write: the conditional UPDATE lets one through."""
    factory = session_factory(settings.database_url)
    first, second = factory(), factory()
    try:
        with factory.begin() as setup:
            job_id = _job(setup).id
        assert first.get(Job, job_id).state == "queued"
        assert second.get(Job, job_id).state == "queued"
        # SQLite holds a read snapshot per open transaction; end the second reader's before the
        # first one writes, or its write would fail on the stale snapshot instead of losing the race.
        second.commit()
        results: dict[str, bool] = {}
        results["first"] = states.transition(first, job_id, to=states.RUNNING, expect=states.QUEUED,
                                             values={"attempts": 1}, message="first")

        def second_writer() -> None:
            # Blocks on the first writer's row (PostgreSQL) or write lock (SQLite) until it commits.
            results["second"] = states.transition(second, job_id, to=states.RUNNING, expect=states.QUEUED,
                                                  values={"attempts": 1}, message="second")
            second.commit()

        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.5)  # give the second writer time to reach its UPDATE; either order proves the same
        first.commit()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the second writer never finished"
        assert sorted(results.values()) == [False, True]
        with factory() as check:
            job = check.get(Job, job_id)
            events = check.execute(select(JobEvent).where(JobEvent.job_id == job_id)).scalars().all()
            assert job.state == "running" and job.attempts == 1
            assert [(e.from_state, e.to_state) for e in events] == [("queued", "running")]
            winner = "first" if results["first"] else "second"
            assert events[0].message == winner
    finally:
        first.close()
        second.close()


def test_stale_fencing_token_is_refused(session):
    job = _job(session, state="running")
    job.attempts = 2
    session.flush()
    assert not states.transition(session, job.id, to=states.SUCCEEDED, expect=states.RUNNING, token=1)
    session.refresh(job)
    assert job.state == "running"
    assert states.transition(session, job.id, to=states.SUCCEEDED, expect=states.RUNNING, token=2)
    session.refresh(job)
    assert job.state == "succeeded" and job.finished_at is not None and job.lease_owner is None


@pytest.mark.parametrize("start,to", [("succeeded", "running"), ("queued", "succeeded"), ("cancelled", "running")])
def test_transitions_outside_the_table_raise(session, start, to):
    job = _job(session, state=start)
    with pytest.raises(states.InvalidTransition):
        states.transition(session, job.id, to=to, expect=start)


def test_terminal_states_have_no_way_out_but_retry():
    assert states.TRANSITIONS["succeeded"] == frozenset()
    assert states.TRANSITIONS["failed"] == {"queued"}
    assert states.TRANSITIONS["cancelled"] == {"queued"}
