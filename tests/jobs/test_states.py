"""The state machine: allowed transitions, compare-and-set, events."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.accounts import create_user
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


def test_second_writer_loses_the_compare_and_set(session):
    job = _job(session)
    assert states.transition(session, job.id, to=states.RUNNING, expect=states.QUEUED)
    # A second claim of the same queued job finds it running and changes nothing.
    assert not states.transition(session, job.id, to=states.RUNNING, expect=states.QUEUED)
    assert session.execute(select(JobEvent).where(JobEvent.job_id == job.id)).scalars().all().__len__() == 1


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
