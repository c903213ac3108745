"""The worker path at the speed of its parts: one heartbeat thread per process, claim+start and
finish as one transaction each, metrics batched off the training thread yet complete, in order
and fenced."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import event, update

from app.accounts import create_user
from app.db import get_engine, session_scope
from app.jobs import service, states
from app.jobs.schemas import parse_spec
from app.models import Checkpoint, Job, JobEvent, Metric, ModelVersion, User
from worker import runner
from worker.heartbeat import THREAD_NAME
from worker.recorder import CHECKPOINT_THREAD

TRAIN = {"kind": "train", "name": "path-mlp", "model": {"arch": "mlp", "hidden_sizes": [16]},
         "dataset": {"id": "builtin:iris"},
         "hyperparameters": {"epochs": 3, "batch_size": 16, "log_every_steps": 1, "learning_rate": 0.01},
         "checkpoint": {"every_epochs": 1, "keep_last": 10}}


def _submit(settings, spec: dict, owner_id: int | None = None) -> int:
    with session_scope(settings.database_url) as s:
        if owner_id is None:
            owner, _ = create_user(session=s, email=f"path-{uuid.uuid4().hex[:10]}@example.com")
        else:
            owner = s.get(User, owner_id)
        return service.submit(session=s, owner=owner, spec=parse_spec(spec), settings=settings).id


@pytest.fixture
def trained(settings):
    """A trained iris model: (owner id, model reference)."""
    job_id = _submit(settings, {**TRAIN, "name": f"base-{uuid.uuid4().hex[:6]}", "hyperparameters": {"epochs": 1}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        return job.owner_id, job.result["model"]


class WriteTransactions:
    """Counts committed transactions that wrote (INSERT, UPDATE, DELETE), by the thread that ran them."""

    def __init__(self, engine):
        self.engine, self.by_thread = engine, Counter()

    def _statement(self, conn, _cursor, statement, _parameters, _context, _many):
        words = statement.upper().split()
        # A statement of data-modifying CTEs (PostgreSQL's claim and finish) starts with WITH.
        if words[0] in ("INSERT", "UPDATE", "DELETE") or words[0] == "WITH" and {"INSERT", "UPDATE", "DELETE"} & set(words):
            conn.info["kiln_test_wrote"] = True

    def _commit(self, conn):
        if conn.info.pop("kiln_test_wrote", False):
            self.by_thread[threading.current_thread().name] += 1

    def _rollback(self, conn):
        conn.info.pop("kiln_test_wrote", None)

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        event.listen(self.engine, "rollback", self._rollback)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)
        event.remove(self.engine, "rollback", self._rollback)


def test_one_worker_process_runs_jobs_in_a_row_on_one_heartbeat_thread(settings, trained, monkeypatch):
    owner_id, model = trained
    seen: list[list[threading.Thread]] = []
    original = runner.Recorder.on_checkpoint

    def note_threads(self, *args, **kwargs):
        seen.append([t for t in threading.enumerate() if "heartbeat" in t.name])
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner.Recorder, "on_checkpoint", note_threads)
    jobs = [_submit(settings, {**TRAIN, "name": f"row-{i}", "hyperparameters": {"epochs": 2}}, owner_id)
            for i in range(3)]
    jobs.append(_submit(settings, {"kind": "predict", "model": model, "inputs": [[5.1, 3.5, 1.4, 0.2]]}, owner_id))
    for job_id in jobs:
        assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
        after = [t for t in threading.enumerate() if "heartbeat" in t.name]
        assert [t.name for t in after] == [THREAD_NAME]  # nothing per job is left behind
        assert len([t for t in threading.enumerate() if t.name.startswith(CHECKPOINT_THREAD)]) <= 1
    assert len(seen) == 6  # two checkpoints per training job, each seen from inside its run
    threads = {t.ident for during in seen for t in during}
    assert all([t.name for t in during] == [THREAD_NAME] for during in seen), seen
    assert len(threads) == 1 and threads == {after[0].ident}


def test_a_prediction_claims_and_starts_in_one_transaction_and_finishes_in_one(settings, trained):
    owner_id, model = trained
    job_id = _submit(settings, {"kind": "predict", "model": model, "inputs": [[5.1, 3.5, 1.4, 0.2]] * 3}, owner_id)
    with WriteTransactions(get_engine(settings.database_url)) as writes:
        assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    # The job's own thread writes twice: claim (with the attempt row), then finish (state, result,
    # the attempt's end, the event). A lease renewal, if one fell due, ran on the heartbeat thread.
    assert writes.by_thread[threading.current_thread().name] == 2, writes.by_thread
    assert set(writes.by_thread) <= {threading.current_thread().name, THREAD_NAME}
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert len(job.result["predictions"]) == 3 and job.attempts == 1


def test_training_writes_once_to_start_once_per_checkpoint_once_to_finish_and_batches_metrics(settings, monkeypatch):
    job_id = _submit(settings, TRAIN)
    reported: list[tuple[str, int, int]] = []
    original = runner.Recorder.on_metrics

    def note(self, scope, epoch, step, values):
        reported.append((scope, epoch, step))
        original(self, scope, epoch, step, values)

    monkeypatch.setattr(runner.Recorder, "on_metrics", note)
    with WriteTransactions(get_engine(settings.database_url)) as writes:
        assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    # The job's thread writes claim+start and finish+registration; each checkpoint (3 epochs,
    # keep_last 10: no retention) is one transaction on the process's checkpoint thread; however
    # many metrics the run reported, none was written by the training thread itself.
    assert writes.by_thread[threading.current_thread().name] == 1 + 1, writes.by_thread
    checkpoint_writes = {name: n for name, n in writes.by_thread.items() if name.startswith(CHECKPOINT_THREAD)}
    assert sum(checkpoint_writes.values()) == 3 and len(checkpoint_writes) == 1, writes.by_thread
    assert set(writes.by_thread) <= {threading.current_thread().name, THREAD_NAME, *checkpoint_writes}
    steps = sum(1 for scope, _, _ in reported if scope == "step")
    assert steps >= 3 * 6  # iris: 90 training rows in batches of 16, one report per step
    # Every report arrived, exactly once, in the order the training loop made it.
    with session_scope(settings.database_url) as s:
        rows = s.query(Metric).filter_by(job_id=job_id).order_by(Metric.id).all()
        assert [(m.scope, m.epoch, m.step) for m in rows] == reported
        step_rows = [m.step for m in rows if m.scope == "step"]
        assert step_rows == sorted(step_rows) == list(range(1, steps + 1))
        assert [m.epoch for m in rows if m.scope == "epoch"] == [1, 2, 3]
        assert [m.scope for m in rows].count("test") == 1
        assert all(m.attempt == 1 for m in rows)
        job = s.get(Job, job_id)
        assert (job.epoch, job.step) == (3, steps) and job.progress == 1.0


def test_retention_adds_no_transaction_and_leaves_rows_and_files_matching(settings):
    # keep_last 1 over 4 epochs: each checkpoint after the first expires an older one. Its file goes
    # after the checkpoint's transaction, its row with the next fenced one (the next checkpoint's,
    # or the finish): one write per checkpoint, and at the end every row has its file and no more.
    from app import storage

    job_id = _submit(settings, {**TRAIN, "name": "retention", "hyperparameters": {**TRAIN["hyperparameters"],
                                                                                  "epochs": 4},
                                "checkpoint": {"every_epochs": 1, "keep_last": 1}})
    with WriteTransactions(get_engine(settings.database_url)) as writes:
        assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    assert writes.by_thread[threading.current_thread().name] == 1 + 1, writes.by_thread
    checkpoint_writes = {name: n for name, n in writes.by_thread.items() if name.startswith(CHECKPOINT_THREAD)}
    assert sum(checkpoint_writes.values()) == 4, writes.by_thread
    with session_scope(settings.database_url) as s:
        rows = s.query(Checkpoint).filter_by(job_id=job_id).order_by(Checkpoint.step).all()
        assert rows[-1].epoch == 4 and 1 <= len(rows) <= 2 and sum(r.is_best for r in rows) == 1
        for row in rows:
            assert storage.read_verified(settings.storage_root, row.path, row.sha256)
        on_disk = sorted(p.name for p in (settings.storage_root / f"jobs/{job_id}/checkpoints").iterdir())
        assert on_disk == sorted(r.path.rsplit("/", 1)[1] for r in rows)
        assert s.query(ModelVersion).filter_by(job_id=job_id).one().checkpoint_id in {r.id for r in rows}


def test_a_revoked_lease_refuses_the_batched_flush_and_stores_nothing_after_it(settings, monkeypatch):
    job_id = _submit(settings, {**TRAIN, "name": "revoked", "dataset": {"id": "builtin:digits"},
                                "hyperparameters": {"epochs": 3, "batch_size": 32, "log_every_steps": 1}})
    revoked_at: list[int] = []
    original = runner.Recorder.on_metrics

    def revoke_at_step_5(self, scope, epoch, step, values):
        original(self, scope, epoch, step, values)
        if step == 5 and not revoked_at:
            # Another worker takes the lease over (as the reaper and a new claim would).
            with session_scope(settings.database_url) as s:
                s.execute(update(Job).where(Job.id == job_id).values(lease_owner="elsewhere:1:1"))
            revoked_at.append(step)
        elif revoked_at:
            time.sleep(0.05)  # keep training slowly, so the heartbeat's flush meets the revocation

    monkeypatch.setattr(runner.Recorder, "on_metrics", revoke_at_step_5)
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "stale"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        # The attempt gave up without touching the job: still the new owner's, still running.
        assert job.state == "running" and job.lease_owner == "elsewhere:1:1"
        refused = s.query(JobEvent).filter_by(job_id=job_id, kind="write_refused").all()
        assert refused and all(e.attempt == 1 and "no longer holds the lease" in e.message for e in refused)
        assert any("queued metrics" in e.message for e in refused), [e.message for e in refused]
        # Nothing reported after the revocation was stored: no metric, no checkpoint.
        assert all(m.step <= 5 for m in s.query(Metric).filter_by(job_id=job_id))
        assert s.query(Checkpoint).filter_by(job_id=job_id).count() == 0
        assert s.query(JobEvent).filter_by(job_id=job_id, to_state="succeeded").count() == 0
        # Leave no running job with a lease behind for the reaper tests sharing this database.
        states.transition(s, job_id, to="failed", expect="running", message="test over")


def test_a_periodic_checkpoint_is_stored_off_the_training_thread_before_any_later_report(settings, monkeypatch):
    # The epoch-1 checkpoint's file write is made slow (longer than the heartbeat's flush interval)
    # while training goes on: the reports of epoch 2 must wait for its row, not overtake it.
    job_id = _submit(settings, {**TRAIN, "name": "slow-disk"})
    from worker import recorder as recorder_module

    write_atomic = recorder_module.storage.write_atomic
    seen: list[tuple[str, int]] = []

    def slow_write(root, relative, data):
        if "-e00001-" in relative:
            time.sleep(1.5)
            with session_scope(settings.database_url) as s:
                later = s.query(Metric).filter(Metric.job_id == job_id, Metric.epoch >= 2).count()
            seen.append((threading.current_thread().name, later))
        return write_atomic(root, relative, data)

    monkeypatch.setattr(recorder_module.storage, "write_atomic", slow_write)
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    assert len(seen) == 1
    thread, later = seen[0]
    assert thread.startswith(CHECKPOINT_THREAD) and later == 0, seen
    with session_scope(settings.database_url) as s:
        assert [c.epoch for c in s.query(Checkpoint).filter_by(job_id=job_id).order_by(Checkpoint.id)] == [1, 2, 3]
        epochs = [m.epoch for m in s.query(Metric).filter_by(job_id=job_id, scope="epoch").order_by(Metric.id)]
        assert epochs == [1, 2, 3]


def test_a_periodic_checkpoint_that_cannot_be_stored_fails_the_attempt_and_the_retry_resumes(settings, monkeypatch):
    job_id = _submit(settings, {**TRAIN, "name": "full-disk"})
    from worker import recorder as recorder_module

    write_atomic = recorder_module.storage.write_atomic

    def full_disk(root, relative, data):
        if "-e00002-" in relative:
            raise OSError(28, "No space left on device")
        return write_atomic(root, relative, data)

    monkeypatch.setattr(recorder_module.storage, "write_atomic", full_disk)
    # The failure reaches the job (an internal error, retried), never a success without its checkpoint.
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "queued"
    with session_scope(settings.database_url) as s:
        assert [c.epoch for c in s.query(Checkpoint).filter_by(job_id=job_id)] == [1]
        assert s.query(ModelVersion).filter_by(job_id=job_id).count() == 0
        traceback = s.query(JobEvent).filter_by(job_id=job_id, kind="traceback").one()
        assert "No space left on device" in traceback.data["traceback"]
    monkeypatch.setattr(recorder_module.storage, "write_atomic", write_atomic)
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))  # the retry's backoff is over
    assert runner.run(job_id, 1, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.resumed_from_epoch == 1 and job.result["epochs_completed"] == 3
