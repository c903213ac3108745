"""Micro-batches at the speed of their parts: the batch is claimed in one write transaction and finished
in one, each job under its own token, and the batched jobs' own messages cost no query."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event

from app.db import get_engine, session_scope
from app.jobs import recovery
from app.models import Attempt, Job, JobEvent, utcnow
from tests.conftest import submit_unpublished
from tests.worker.test_worker_path import WriteTransactions, trained  # noqa: F401 - trained is a fixture
from worker import runner
from worker.heartbeat import THREAD_NAME

ROW = [5.1, 3.5, 1.4, 0.2]


def _queue(settings, trained, count: int) -> list[int]:
    owner_id, model = trained
    return [submit_unpublished(settings, owner_id, {"kind": "predict", "model": model, "inputs": [ROW] * (1 + i % 2)})
            for i in range(count)]


def _events(job_id: int, settings) -> list[JobEvent]:
    with session_scope(settings.database_url) as s:
        return s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id).all()


def test_a_micro_batch_is_claimed_in_one_transaction_and_finished_in_one(settings, trained):
    ids = _queue(settings, trained, 6)
    with WriteTransactions(get_engine(settings.database_url)) as writes:
        assert runner.run(ids[0], 0, worker="inline", settings=settings) == "succeeded"
    # The lead's claim with the others' (one transaction), everyone's finish; a lease renewal, if
    # one fell due, ran on the heartbeat thread.
    assert writes.by_thread[threading.current_thread().name] == 2, writes.by_thread
    assert set(writes.by_thread) <= {threading.current_thread().name, THREAD_NAME}
    with session_scope(settings.database_url) as s:
        jobs = s.query(Job).filter(Job.id.in_(ids)).order_by(Job.id).all()
        assert [(j.state, j.attempts) for j in jobs] == [("succeeded", 1)] * 6
        assert [len(j.result["predictions"]) for j in jobs] == [1 + i % 2 for i in range(6)]
        attempts = s.query(Attempt).filter(Attempt.job_id.in_(ids)).all()
        assert sorted((a.job_id, a.number, a.outcome) for a in attempts) == [(i, 1, "succeeded") for i in ids]
    for job_id in ids:
        kinds = [(e.kind, e.from_state, e.to_state) for e in _events(job_id, settings)]
        assert kinds.count(("state", "queued", "running")) == 1 and kinds.count(("state", "running", "succeeded")) == 1
        assert sum(1 for kind, _, _ in kinds if kind == "batched") == 1


def test_a_member_whose_attempt_went_stale_is_refused_alone(settings, trained, monkeypatch):
    ids = _queue(settings, trained, 4)
    from worker.ml import prediction

    original = prediction.predict_many

    def predict_while_the_reaper_takes_one_back(*args, **kwargs):
        outcome = original(*args, **kwargs)
        # During the forward pass the reaper took the third job back (its lease "expired").
        with session_scope(settings.database_url, write=True) as s:
            recovery.requeue_or_fail(session=s, job=s.get(Job, ids[2]), error_class="worker_lost",
                                     message="test: lease taken back", now=utcnow())
        return outcome

    monkeypatch.setattr(prediction, "predict_many", predict_while_the_reaper_takes_one_back)
    assert runner.run(ids[0], 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        states = {j.id: (j.state, j.attempts, j.result) for j in s.query(Job).filter(Job.id.in_(ids))}
    for job_id in (ids[0], ids[1], ids[3]):
        assert states[job_id][:2] == ("succeeded", 1)
    # The stale attempt wrote nothing to the job it lost: queued again for its next attempt, no result.
    assert states[ids[2]] == ("queued", 1, None)
    events = _events(ids[2], settings)
    assert any(e.kind == "write_refused" and e.attempt == 1 for e in events), [(e.kind, e.message) for e in events]
    assert not any(e.to_state == "succeeded" or e.kind == "batched" for e in events)
    monkeypatch.undo()
    with session_scope(settings.database_url, write=True) as s:  # its next attempt runs at once, and alone
        s.query(Job).filter_by(id=ids[2]).update({"not_before": None})
    assert runner.run(ids[2], 1, worker="inline", settings=settings) == "succeeded"


def test_a_batched_jobs_own_message_is_dropped_without_a_query(settings, trained):
    ids = _queue(settings, trained, 3)
    assert runner.run(ids[0], 0, worker="inline", settings=settings) == "succeeded"
    engine, seen = get_engine(settings.database_url), []

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        # The messages published for the other two (token 0) arrive after the batch claimed them.
        assert [runner.run(job_id, 0, worker="inline", settings=settings) for job_id in ids[1:]] == ["dropped"] * 2
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert seen == []
    with session_scope(settings.database_url) as s:
        assert {j.attempts for j in s.query(Job).filter(Job.id.in_(ids))} == {1}


@pytest.fixture(autouse=True)
def _nothing_queued_of_this_model(settings, trained):
    """A batch takes every queued prediction of its model version: start each test with none left."""
    yield
    with session_scope(settings.database_url) as s:
        left = s.query(Job).filter_by(state="queued", kind="predict").filter(
            Job.spec["model"].as_string() == trained[1]).count()
    assert left == 0


def test_a_lone_prediction_looks_for_company_inside_its_claim_transaction(settings, trained):
    ids = _queue(settings, trained, 1)
    engine, seen = get_engine(settings.database_url), []
    main = threading.current_thread()

    def on_execute(_conn, _cursor, statement, *_args):
        if threading.current_thread() is main:
            seen.append(" ".join(statement.split()))

    def on_commit(_conn):
        if threading.current_thread() is main:
            seen.append("COMMIT")

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        assert runner.run(ids[0], 0, worker="inline", settings=settings) == "succeeded"
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
    # On PostgreSQL the compare-and-set is a CTE of the claim's one statement (``WITH … AS (UPDATE …``).
    claim = next(i for i, s in enumerate(seen) if "UPDATE jobs SET state=" in s)
    company = next(i for i, s in enumerate(seen) if s.startswith("SELECT jobs.id, jobs.attempts, jobs.spec"))
    # Found alone in the claim's own transaction: no transaction of its own, no second look.
    assert claim < company < seen.index("COMMIT", claim), seen
    assert sum(1 for s in seen if s.startswith("SELECT jobs.id, jobs.attempts, jobs.spec")) == 1, seen


def test_a_message_of_a_job_another_process_claimed_costs_one_narrow_read(settings, trained):
    from app.jobs import attempts

    ids = _queue(settings, trained, 1)
    with session_scope(settings.database_url, write=True) as s:  # another worker's batch took it
        assert attempts.claim(session=s, job_id=ids[0], token=0, worker="other", host="h", pid=1, lease_seconds=600)
    engine, seen = get_engine(settings.database_url), []

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        assert runner.run(ids[0], 0, worker="inline", settings=settings) == "dropped"
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    # Told apart by the probe on a driver connection: no session, no read of the job and its model.
    assert seen == []
    with session_scope(settings.database_url) as s:
        job = s.get(Job, ids[0])
        assert (job.state, job.attempts, job.lease_owner) == ("running", 1, "other:1:1")
