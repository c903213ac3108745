"""The training side's writes at the cost of their statements: a checkpoint's transaction (queued
metrics, lease renewal, the row, retention) is a handful of prebuilt Core statements, with no reload
of the job's row and no fold of the metric curves; the curves are folded every few hundred
reports and in the attempt's final transaction, and drawn whole between folds."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import event, func, select

from app import webhooks
from app.accounts import create_user
from app.db import get_engine, session_scope
from app.jobs import attempts, metric_curves, service
from app.jobs.schemas import parse_spec
from app.models import Checkpoint, Job, Metric, MetricCurveChunk, User, WebhookDelivery, utcnow
from worker import recorder as recorder_module
from worker import runner
from worker.recorder import CHECKPOINT_THREAD

TRAIN = {"kind": "train", "name": "ckpt-tx", "model": {"arch": "mlp", "hidden_sizes": [16]},
         "dataset": {"id": "builtin:iris"},
         "hyperparameters": {"epochs": 4, "batch_size": 16, "log_every_steps": 1, "learning_rate": 0.01},
         "checkpoint": {"every_epochs": 1, "keep_last": 2}}


def _submit(settings, spec: dict) -> int:
    with session_scope(settings.database_url) as s:
        owner, _ = create_user(session=s, email=f"ckpt-tx-{uuid.uuid4().hex[:10]}@example.com")
        return service.submit(session=s, owner=owner, spec=parse_spec(spec), settings=settings).id


class Transactions:
    """The statements of each committed transaction (BEGIN aside), by the thread that ran it."""

    def __init__(self, engine):
        self.engine, self.committed = engine, []

    def _statement(self, conn, _cursor, statement, _parameters, _context, _many):
        if not statement.lstrip().upper().startswith("BEGIN"):
            conn.info.setdefault("kiln_test_statements", []).append(" ".join(statement.split()))

    def _commit(self, conn):
        self.committed.append((threading.current_thread().name, conn.info.pop("kiln_test_statements", [])))

    def _rollback(self, conn):
        conn.info.pop("kiln_test_statements", None)

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        event.listen(self.engine, "rollback", self._rollback)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)
        event.remove(self.engine, "rollback", self._rollback)


def _curves_from_reports(settings, job_id: int, points: int) -> list:
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Metric.id, Metric.scope, Metric.epoch, Metric.step, Metric.values)
                         .where(Metric.job_id == job_id).order_by(Metric.id)).all()
    return _plain(metric_curves.curves_of(rows, points))


def _plain(curves) -> list:
    return [(c.scope, c.name, c.count, c.points.tolist()) for c in curves]


def _read(settings, job_id: int, points: int) -> list:
    with session_scope(settings.database_url) as s:
        return _plain(metric_curves.read(session=s, job_id=job_id, points=points))


def test_a_checkpoint_transaction_is_a_few_core_statements_without_a_job_reload_or_a_fold(settings, monkeypatch):
    monkeypatch.setattr(recorder_module, "FOLD_SECONDS", 3600.0)  # however slow the machine: no fold by age
    job_id = _submit(settings, TRAIN)
    with Transactions(get_engine(settings.database_url)) as seen:
        assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    checkpoints = [statements for thread, statements in seen.committed
                   if thread.startswith(CHECKPOINT_THREAD) and any("INSERT INTO checkpoints" in s for s in statements)]
    assert len(checkpoints) == 4  # every_epochs 1: one per epoch, none skipped
    for statements in checkpoints:
        # The renewal (returning the stop requests and webhook), the attempt's heartbeat, the queued
        # metrics, expired rows, the best flag, the row, retention: never more.
        assert len(statements) <= 7, statements
        assert statements[0].startswith("UPDATE jobs SET") and "RETURNING" in statements[0], statements
        assert not [s for s in statements if s.startswith("SELECT") and "FROM jobs" in s], statements
        assert not [s for s in statements if "metric_curve_chunks" in s], statements  # no fold per checkpoint
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Checkpoint.epoch, Checkpoint.is_best).where(Checkpoint.job_id == job_id)).all()
        assert len(rows) <= 3 and sum(best for _, best in rows) == 1 and max(e for e, _ in rows) == 4
        # The final transaction folded every report: the curves hold them all.
        covered = s.execute(select(func.max(MetricCurveChunk.covered_id))
                            .where(MetricCurveChunk.job_id == job_id)).scalar_one()
        assert covered == s.execute(select(func.max(Metric.id)).where(Metric.job_id == job_id)).scalar_one()
    for points in (10000, 40, 8):
        assert _read(settings, job_id, points) == _curves_from_reports(settings, job_id, points)


def test_a_worker_folds_the_curves_every_few_reports_and_at_its_end(settings, monkeypatch):
    # More reports than an epoch brings (7 steps and the epoch's report): a flush per checkpoint must
    # not fold every time, however the heartbeat's flushes fall between them.
    every = 20
    monkeypatch.setattr(recorder_module, "FOLD_REPORTS", every)
    monkeypatch.setattr(recorder_module, "FOLD_SECONDS", 3600.0)
    folds: list[int] = []
    original = metric_curves.fold

    def counted(*, session, job_id):
        folds.append(job_id)
        original(session=session, job_id=job_id)

    monkeypatch.setattr(metric_curves, "fold", counted)
    flushes = []
    original_write = recorder_module.Recorder._write_queued

    def noted(self, session, **kwargs):
        flushes.append(kwargs)
        return original_write(self, session, **kwargs)

    monkeypatch.setattr(recorder_module.Recorder, "_write_queued", noted)
    job_id = _submit(settings, {**TRAIN, "hyperparameters": {**TRAIN["hyperparameters"], "epochs": 6}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        reports = s.execute(select(func.count()).select_from(Metric).where(Metric.job_id == job_id)).scalar_one()
        covered = s.execute(select(func.max(MetricCurveChunk.covered_id))
                            .where(MetricCurveChunk.job_id == job_id)).scalar_one()
        assert covered == s.execute(select(func.max(Metric.id)).where(Metric.job_id == job_id)).scalar_one()
    assert reports > 6 * 5  # a report per step and per epoch, and the test report
    assert 2 <= len(folds) < len(flushes) and len(folds) <= reports // every + 1, (len(folds), len(flushes))
    for points in (10000, 40, 8):
        assert _read(settings, job_id, points) == _curves_from_reports(settings, job_id, points)


def _reports(start: int, end: int) -> list[dict]:
    return [{"scope": "step", "epoch": 0, "step": i, "at": utcnow(),
             "values": {"loss": 1.0 / (i + 1) + (3.0 if i % 37 == 0 else 0.0), "lr": 0.001 * i}}
            for i in range(start, end)]


def test_curves_read_between_folds_are_the_curves_of_every_report(settings):
    job_id = _submit(settings, TRAIN)
    with session_scope(settings.database_url, write=True) as s:
        owner = attempts.lease_owner(attempts.claim(session=s, job_id=job_id, token=0, worker="w", host="h",
                                                    pid=1, lease_seconds=60))
    try:
        _fold_now_and_then(settings, job_id, owner)
    finally:  # no running job is left for a later test's reaper to find
        with session_scope(settings.database_url, write=True) as s:
            attempts.finish(session=s, job_id=job_id, token=1, to="cancelled", message="test cleanup")


def _fold_now_and_then(settings, job_id: int, owner: str) -> None:
    start = 0
    # Uneven batches, folded now and then: each read must equal the curves drawn from all reports.
    for size, fold in ((3, False), (40, True), (90, False), (5, False), (300, True), (1, False), (70, False)):
        with session_scope(settings.database_url, write=True) as s:
            attempts.record_batch(session=s, job_id=job_id, token=1, owner=owner, lease_seconds=60,
                                  metrics=_reports(start, start + size), fold=fold)
        start += size
        for points in (10000, 2000):  # buckets shorter than a block: drawn from the points, exactly
            assert _read(settings, job_id, points) == _curves_from_reports(settings, job_id, points), (start, points)
        # Longer buckets are drawn from block summaries (edges on block edges): every point counted,
        # both ends kept, the highest spike kept.
        every = {c[1]: c[3] for c in _curves_from_reports(settings, job_id, 10000)}
        for scope, name, count, drawn in _read(settings, job_id, 12):
            assert count == len(every[name]) == start and len(drawn) <= 12
            assert drawn[0] == every[name][0] and drawn[-1] == every[name][-1]
            assert max(p[3] for p in drawn) == max(p[3] for p in every[name])
    with session_scope(settings.database_url) as s:
        total = s.execute(select(func.max(MetricCurveChunk.total)).where(MetricCurveChunk.job_id == job_id)).scalar()
    assert total == 3 + 40 + 90 + 5 + 300  # the last fold took every report stored before it, no more


def test_a_checkpoint_row_with_its_webhook_event_comes_from_the_renewal(settings, make_user, monkeypatch):
    published = []
    monkeypatch.setattr("app.queue.publish_webhook", lambda settings, **kw: published.append(kw) or True)
    user_id, _ = make_user()
    with session_scope(settings.database_url) as s:
        user = s.get(User, user_id)
        webhooks.rotate_secret(session=s, user=user, settings=settings)
        spec = parse_spec({**TRAIN, "name": "hooked-ckpt",
                           "webhook": {"url": "https://hooks.example.invalid/", "events": ["checkpoint"]}})
        job_id = service.submit(session=s, owner=user, spec=spec,
                                settings=settings.with_overrides(webhook_allow_private=True)).id
    with session_scope(settings.database_url, write=True) as s:
        owner = attempts.lease_owner(attempts.claim(session=s, job_id=job_id, token=0, worker="w", host="h",
                                                    pid=1, lease_seconds=60))
    try:
        with Transactions(get_engine(settings.database_url)) as seen, \
                session_scope(settings.database_url, write=True) as s:
            lease = attempts.record_batch(session=s, job_id=job_id, token=1, owner=owner, lease_seconds=60,
                                          metrics=_reports(0, 2), fold=False)
            assert lease.cancel_requested_at is None and lease.name == "hooked-ckpt"
            checkpoint_id = attempts.add_checkpoint(
                session=s, job_id=job_id, token=1, owner=owner, lease_seconds=60, epoch=1, step=8,
                path="jobs/x/a.safetensors", size=1, sha256="0" * 64, metric_name="val_loss", metric_value=0.5,
                is_best=True, reason="periodic", lease=lease)
        (_, statements), = seen.committed
        # Renewal, heartbeat, metrics, best flag, row, outbox row: nothing read back.
        assert [s.split(" ", 3)[:3] for s in statements] == [
            ["UPDATE", "jobs", "SET"], ["UPDATE", "job_attempts", "SET"], ["INSERT", "INTO", "metrics"],
            ["UPDATE", "checkpoints", "SET"], ["INSERT", "INTO", "checkpoints"],
            ["INSERT", "INTO", "webhook_deliveries"]], statements
        with session_scope(settings.database_url) as s:
            row = s.get(Checkpoint, checkpoint_id)
            assert (row.job_id, row.attempt, row.epoch, row.is_best, row.created_at is not None) == (
                job_id, 1, 1, True, True)
            payload = s.execute(select(WebhookDelivery.payload).where(
                WebhookDelivery.job_id == job_id, WebhookDelivery.event == "checkpoint")).scalar_one()
        assert payload["data"] | {"job_id": 0} == {
            "job_id": 0, "kind": "train", "name": "hooked-ckpt", "state": "running", "attempt": 1,
            "checkpoint_id": checkpoint_id, "epoch": 1, "step": 8, "reason": "periodic", "is_best": True}
        # A stale token writes nothing.
        with pytest.raises(attempts.StaleAttempt), session_scope(settings.database_url, write=True) as s:
            attempts.add_checkpoint(
                session=s, job_id=job_id, token=2, owner=owner, lease_seconds=60, epoch=2, step=16,
                path="jobs/x/b.safetensors", size=1, sha256="0" * 64, metric_name=None, metric_value=None,
                is_best=False, reason="periodic")
    finally:
        with session_scope(settings.database_url, write=True) as s:
            attempts.finish(session=s, job_id=job_id, token=1, to="cancelled", message="test cleanup")
            s.execute(WebhookDelivery.__table__.update().where(WebhookDelivery.job_id == job_id)
                      .values(status="failed", next_attempt_at=None))
            s.info.clear()
