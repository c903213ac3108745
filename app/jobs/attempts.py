"""Services a worker calls while it runs an attempt: claim, renew, fenced writes, finish.

Every write carries the attempt's fencing token (its number) and lease owner; a write from an
attempt that lost its lease is refused with :class:`StaleAttempt` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (Float, Integer, Row, SmallInteger, String, bindparam, case, cast, func, insert, literal, or_,
                        select, tuple_, update)
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import CTE

from app import model_registry, webhooks
from app.jobs import metric_curves, states
from app.jobs.errors import StaleAttempt
from app.models import Attempt, Checkpoint, Job, JobEvent, Metric, ModelVersion, UsageTotal, utcnow
from app.usage import Tally


def claim(
    *, session: Session, job_id: int, token: int, worker: str, host: str, pid: int, lease_seconds: float,
    start: tuple[int, int] | None = None, resumed: bool = False, device: str | None = None,
    tally: Tally | None = None,
) -> Claimed | None:
    """Take a queued job for one new attempt, or None if it is not claimable with ``token``.

    ``start`` (epoch, step) is where the attempt really starts (the checkpoint it verified before
    claiming, or (0, 0)); given, it is recorded in the same transaction, as :func:`mark_start` would.
    ``device`` (``cpu``, ``cuda``) is the kind of device it runs on, for usage accounting.
    """
    claimed = claim_many(session=session, jobs=[(job_id, token)], worker=worker, host=host, pid=pid,
                         lease_seconds=lease_seconds, start=start, resumed=resumed, device=device, tally=tally)
    return claimed[0] if claimed else None


@dataclass
class Claimed:
    """The attempt a claim started, as written to its row (no ORM instance: a claim builds none)."""

    job_id: int
    number: int
    worker: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    start_epoch: int | None = None
    start_step: int | None = None
    device: str | None = None
    ended_at: datetime | None = None
    outcome: str | None = None


_JOBS = Job.__table__
_CLAIMED_AT = bindparam("kiln_claimed_at", type_=_JOBS.c.started_at.type)
_STARTED_AT = func.coalesce(_JOBS.c.started_at, _CLAIMED_AT)
_CLAIMABLE = (_JOBS.c.cancel_requested_at.is_(None), _JOBS.c.pause_requested_at.is_(None),
              or_(_JOBS.c.not_before.is_(None), _JOBS.c.not_before <= _CLAIMED_AT))
# The attempt number and lease owner each claimed job gets, from its own row: ``attempts`` in SET
# is the row's value before the UPDATE, i.e. the token the compare-and-set matched.
_NEXT_ATTEMPT = _JOBS.c.attempts + 1
_LEASE_OWNER = bindparam("kiln_owner_prefix", type_=String()) + cast(_JOBS.c.attempts + 1, String())
_INSERT_ATTEMPT = insert(Attempt.__table__)


def claim_many(
    *, session: Session, jobs: Sequence[tuple[int, int]], worker: str, host: str, pid: int, lease_seconds: float,
    start: tuple[int, int] | None = None, resumed: bool = False, device: str | None = None,
    tally: Tally | None = None,
) -> list[Claimed]:
    """Take each queued job of ``jobs`` (id, token) for one new attempt, as :func:`claim` does, with
    no read before it; returns the attempts, in the order of ``jobs``, of the ones that were claimable.

    One statement per step for the whole batch, whatever its size: the compare-and-set of every
    job (one UPDATE matching each row on its own id and token), the state events (one INSERT), the
    attempt rows (one INSERT), the usage totals (one upsert per owner; with ``tally``, added there
    for the caller to apply with its other changes). On PostgreSQL all of them are one statement
    (data-modifying CTEs; the usage totals too unless ``tally`` is given).
    """
    if not jobs:
        return []
    now = utcnow()
    moves = [states.Move(job_id, token, message=f"attempt {token + 1} started on {worker}") for job_id, token in jobs]
    shared: dict[str, Any] = {
        "attempts": _NEXT_ATTEMPT, "lease_owner": _LEASE_OWNER,
        "lease_expires_at": now + timedelta(seconds=lease_seconds), "started_at": _STARTED_AT,
        "error_class": None, "error_message": None,
    }
    if start is not None:
        shared.update(epoch=start[0], step=start[1])
        if resumed:
            shared["resumed_from_epoch"] = start[0]
    # Claimable: queued with the token (the compare-and-set), no stop asked for, past its backoff;
    # all in the UPDATE, so a claim reads nothing first. Bound, not literal, so the statement is built once.
    params = {"kiln_claimed_at": now, "kiln_owner_prefix": f"{worker}:{pid}:"}
    postgres = session.connection().dialect.name == "postgresql"
    if postgres:
        # The attempt rows go in the compare-and-set's own statement (a CTE over the rows it moved).
        params.update(kiln_worker=worker, kiln_host=host, kiln_pid=pid, kiln_device=device,
                      kiln_start_epoch=start[0] if start is not None else None,
                      kiln_start_step=start[1] if start is not None else None)
    won = states.transition_batch(session, moves, to=states.RUNNING, expect=states.QUEUED, values=shared,
                                  where=_CLAIMABLE, shape="claim", params=params,
                                  follow=None if not postgres else _attempts_started if tally is not None
                                  else _attempts_started_and_counted)
    if len(won) < len(moves):
        taken = {w.move.job_id for w in won}
        _honour_stop_requests(session, [m for m in moves if m.job_id not in taken])
    if not won:
        return []
    # Without ``start``, start_epoch/start_step stay NULL until mark_start knows where it began.
    claimed = [Claimed(job_id=moved.move.job_id, number=moved.attempt, worker=worker, host=host, pid=pid,
                       started_at=now, heartbeat_at=now, start_epoch=start[0] if start is not None else None,
                       start_step=start[1] if start is not None else None, device=device) for moved in won]
    if not postgres:
        session.connection().execute(_INSERT_ATTEMPT, [
            {"job_id": c.job_id, "number": c.number, "worker": worker, "host": host, "pid": pid, "started_at": now,
             "heartbeat_at": now, "start_epoch": c.start_epoch, "start_step": c.start_step, "device": device}
            for c in claimed])
    if start is not None and resumed:
        record_events(session=session, events=[
            dict(job_id=c.job_id, attempt=c.number, kind="resumed", message=f"resumed from epoch {start[0]}")
            for c in claimed])
    if postgres and tally is None:
        return claimed  # counted in the claim's statement
    usage = tally if tally is not None else Tally()
    for moved in won:
        usage.add(moved.owner_id, attempts=1)
    if tally is None:
        usage.apply(session=session)
    return claimed


def _attempts_started(moved: CTE) -> list[CTE]:
    """PostgreSQL's attempt rows of a claim, as a CTE of its compare-and-set statement: one per job
    it moved, numbered with the job's new ``attempts`` (the ``kiln_*`` values of :func:`claim_many`)."""
    columns = _ATTEMPT_ROWS.c
    at = bindparam("kiln_claimed_at", type_=columns.started_at.type)
    rows = select(moved.c.id, moved.c.attempts, bindparam("kiln_worker", type_=columns.worker.type),
                  bindparam("kiln_host", type_=columns.host.type), bindparam("kiln_pid", type_=columns.pid.type),
                  at, at, bindparam("kiln_start_epoch", type_=columns.start_epoch.type),
                  bindparam("kiln_start_step", type_=columns.start_step.type),
                  bindparam("kiln_device", type_=columns.device.type))
    return [insert(_ATTEMPT_ROWS).from_select(
        ["job_id", "number", "worker", "host", "pid", "started_at", "heartbeat_at", "start_epoch", "start_step",
         "device"], rows).cte("kiln_attempts")]


def _attempts_started_and_counted(moved: CTE) -> list[CTE]:
    """:func:`_attempts_started`, and one more attempt per job on its owner's totals: for a claim
    that is its transaction's last write (with ``tally``, the caller writes the totals last instead,
    so that the totals row is not held while the rest of its transaction runs)."""
    per_owner = (select(moved.c.owner_id, literal(0, SmallInteger()), literal(0, Integer()),
                        cast(func.count(), Integer()), literal(0.0, Float()), literal(0.0, Float()))
                 .group_by(moved.c.owner_id).order_by(moved.c.owner_id))
    return [*_attempts_started(moved), _added_to_totals(per_owner, ("attempts",))]


_ATTEMPT_ROWS = Attempt.__table__


def _honour_stop_requests(session: Session, unclaimed: list[states.Move]) -> None:
    """Of the jobs a claim did not take, cancel or pause those still queued with their token whose
    user asked them to stop (requeued, say, by a worker shutting down, after the request)."""
    if not unclaimed:
        return
    tokens = {m.job_id: m.token for m in unclaimed}
    rows = session.execute(
        select(Job.id, Job.attempts, Job.cancel_requested_at, Job.pause_requested_at)
        .where(Job.id.in_(tokens), Job.state == states.QUEUED)
    ).all()
    for job_id, token, cancel_requested_at, pause_requested_at in rows:
        if token != tokens[job_id] or (cancel_requested_at is None and pause_requested_at is None):
            continue
        to = states.CANCELLED if cancel_requested_at is not None else states.PAUSED
        states.transition(session, job_id, to=to, expect=states.QUEUED, token=token, message=f"{to} as requested")


def lease_owner(attempt: Attempt | Claimed) -> str:
    """The lease owner string :func:`claim` wrote for ``attempt``."""
    return f"{attempt.worker}:{attempt.pid}:{attempt.number}"


def renew(*, session: Session, job_id: int, token: int, owner: str, lease_seconds: float,
          values: dict[str, Any] | None = None) -> Job:
    """Extend the lease (the fence for every write); returns the fresh job row or raises StaleAttempt.

    ``values`` are progress columns (epoch, step, progress) set in the same fenced UPDATE.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == token, Job.state == states.RUNNING, Job.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise StaleAttempt(f"job {job_id}: attempt {token} no longer holds the lease")
    session.execute(
        update(Attempt).where(Attempt.job_id == job_id, Attempt.number == token).values(heartbeat_at=now)
    )
    return session.get(Job, job_id, populate_existing=True)


def record_refused_write(*, session: Session, job_id: int, token: int, what: str, detail: str) -> None:
    """Leave a durable trace of a fenced write :func:`renew` refused.

    Call it in a fresh transaction: the refused one is rolled back when StaleAttempt propagates.
    """
    session.add(JobEvent(job_id=job_id, kind="write_refused", attempt=token, message=f"{what} refused: {detail}"))


def mark_start(*, session: Session, job_id: int, token: int, owner: str, lease_seconds: float,
               epoch: int, step: int, resumed: bool) -> None:
    """Record where the attempt really starts (its checkpoint), and say so if it resumed."""
    job = renew(session=session, job_id=job_id, token=token, owner=owner, lease_seconds=lease_seconds)
    job.epoch, job.step = epoch, step
    session.execute(
        update(Attempt).where(Attempt.job_id == job_id, Attempt.number == token).values(start_epoch=epoch, start_step=step)
    )
    if resumed:
        job.resumed_from_epoch = epoch
        record_event(session=session, job_id=job_id, token=token, kind="resumed", message=f"resumed from epoch {epoch}")


def record_metrics(
    *, session: Session, job_id: int, token: int, owner: str, lease_seconds: float,
    scope: str, epoch: int, step: int, values: dict[str, float],
) -> None:
    """Store one metrics report from the attempt holding the lease."""
    job = renew(session=session, job_id=job_id, token=token, owner=owner, lease_seconds=lease_seconds)
    session.add(Metric(job_id=job_id, attempt=token, scope=scope, epoch=epoch, step=step, values=values))
    if scope != "test":
        job.epoch, job.step = epoch, step
    metric_curves.fold(session=session, job_id=job_id)


_JOBS, _ATTEMPTS, _CHECKPOINTS = Job.__table__, Attempt.__table__, Checkpoint.__table__
# The renewal's RETURNING: what the heartbeat reads (stop requests) and a checkpoint's webhook needs.
_LEASE_COLUMNS = (_JOBS.c.cancel_requested_at, _JOBS.c.pause_requested_at, _JOBS.c.webhook, _JOBS.c.kind,
                  _JOBS.c.name)
_RENEWALS: dict[tuple[str, ...], Any] = {}  # by the progress columns it also sets; built once per process
_BEAT = (update(_ATTEMPTS).where(_ATTEMPTS.c.job_id == bindparam("r_job"), _ATTEMPTS.c.number == bindparam("r_token"))
         .values(heartbeat_at=bindparam("r_now", type_=_ATTEMPTS.c.heartbeat_at.type)))
_INSERT_METRICS = insert(Metric.__table__)
_INSERT_CHECKPOINT = insert(_CHECKPOINTS).returning(_CHECKPOINTS.c.id)
_NOT_BEST = (update(_CHECKPOINTS).where(_CHECKPOINTS.c.job_id == bindparam("k_job"), _CHECKPOINTS.c.is_best.is_(True))
             .values(is_best=False))
_RETENTION = (select(_CHECKPOINTS.c.id, _CHECKPOINTS.c.path, _CHECKPOINTS.c.is_best)
              .where(_CHECKPOINTS.c.job_id == bindparam("k_job"))
              .order_by(_CHECKPOINTS.c.step.desc(), _CHECKPOINTS.c.id.desc()).offset(bindparam("k_keep")))


def _renewal(columns: tuple[str, ...]) -> Any:
    statement = _RENEWALS.get(columns)
    if statement is None:
        statement = _RENEWALS[columns] = (
            update(_JOBS)
            .where(_JOBS.c.id == bindparam("r_job"), _JOBS.c.attempts == bindparam("r_token"),
                   _JOBS.c.state == states.RUNNING, _JOBS.c.lease_owner == bindparam("r_owner"))
            .values(lease_expires_at=bindparam("r_expires", type_=_JOBS.c.lease_expires_at.type),
                    updated_at=bindparam("r_now", type_=_JOBS.c.updated_at.type),
                    **{c: bindparam(f"r_{c}", type_=_JOBS.c[c].type) for c in columns})
            .returning(*_LEASE_COLUMNS))
    return statement


def _renew_lease(session: Session, *, job_id: int, token: int, owner: str, lease_seconds: float,
                 values: dict[str, Any]) -> Row:
    """:func:`renew` in two prebuilt Core statements, the job's row not reloaded: returns the
    :data:`_LEASE_COLUMNS` of the job, or raises StaleAttempt."""
    now = utcnow()
    connection = session.connection()
    params = {"r_job": job_id, "r_token": token, "r_owner": owner, "r_now": now,
              "r_expires": now + timedelta(seconds=lease_seconds), **{f"r_{c}": v for c, v in values.items()}}
    rows = connection.execute(_renewal(tuple(sorted(values))), params).all()
    if len(rows) != 1:
        raise StaleAttempt(f"job {job_id}: attempt {token} no longer holds the lease")
    connection.execute(_BEAT, {"r_job": job_id, "r_token": token, "r_now": now})
    return rows[0]


def record_batch(
    *, session: Session, job_id: int, token: int, owner: str, lease_seconds: float,
    metrics: list[dict[str, Any]], progress: float | None = None, fold: bool = True,
) -> Row:
    """Renew the lease and store queued metrics reports (in order) and progress, all in one fenced write.

    Each report is a dict of scope, epoch, step, values and ``at`` (when it was measured). ``fold``:
    also fold every report no curve chunk covers yet into the metric curves (a worker folds every
    few hundred reports and in its final transaction; a reader of the curves takes the reports
    after them from ``metrics``, so the curves are whole either way). Core statements built once
    per process, and no ORM work: returns the job's stop requests and webhook (cancel_requested_at,
    pause_requested_at, webhook, kind, name).
    """
    changes: dict[str, Any] = {}
    last = next((m for m in reversed(metrics) if m["scope"] != "test"), None)
    if last is not None:
        changes.update(epoch=last["epoch"], step=last["step"])
    if progress is not None:
        changes["progress"] = max(0.0, min(1.0, progress))
    lease = _renew_lease(session, job_id=job_id, token=token, owner=owner, lease_seconds=lease_seconds,
                         values=changes)
    if metrics:
        # One multi-row INSERT; rows go in list order, so ids increase with the order of the reports.
        session.connection().execute(_INSERT_METRICS, [{"job_id": job_id, "attempt": token, **m} for m in metrics])
    if fold:
        metric_curves.fold(session=session, job_id=job_id)  # the curves a downsampled poll reads
    return lease


def add_checkpoint(
    *, session: Session, job_id: int, token: int, owner: str, lease_seconds: float,
    epoch: int, step: int, path: str, size: int, sha256: str, metric_name: str | None,
    metric_value: float | None, is_best: bool, reason: str, lease: Row | None = None,
) -> int:
    """Record a checkpoint file written by the attempt holding the lease; returns the row's id.

    ``lease``: what :func:`record_batch` returned, when it already renewed the lease in this
    transaction (else it is renewed here). Core statements only: the row and, if the job's
    webhook asks for it, its outbox row.
    """
    if lease is None:
        lease = _renew_lease(session, job_id=job_id, token=token, owner=owner, lease_seconds=lease_seconds,
                             values={})
    connection = session.connection()
    if is_best:
        connection.execute(_NOT_BEST, {"k_job": job_id})
    checkpoint_id = connection.execute(_INSERT_CHECKPOINT, {
        "job_id": job_id, "attempt": token, "epoch": epoch, "step": step, "path": path, "size_bytes": size,
        "sha256": sha256, "metric_name": metric_name, "metric_value": metric_value, "is_best": is_best,
        "reason": reason, "created_at": utcnow()}).scalar_one()
    webhooks.record_checkpoint(session=session, job_id=job_id, attempt=token, checkpoint_id=checkpoint_id,
                               epoch=epoch, step=step, reason=reason, is_best=is_best, job=lease)
    return checkpoint_id


def expired_checkpoints(*, session: Session, job_id: int, keep_last: int) -> list[Row]:
    """Checkpoints beyond the newest ``keep_last`` that are not the best (retention): rows of id and path."""
    rows = session.connection().execute(_RETENTION, {"k_job": job_id, "k_keep": keep_last}).all()
    return [row for row in rows if not row.is_best]


def checkpoints_newest_first(*, session: Session, job_id: int) -> list[Checkpoint]:
    """A job's checkpoints, newest position first (resume tries them in this order)."""
    return list(
        session.execute(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
        ).scalars()
    )


def record_event(*, session: Session, job_id: int, token: int | None, kind: str, message: str,
                 data: dict[str, Any] | None = None) -> None:
    """Append a non-state event (resumed, checkpoint fallback, ...)."""
    session.add(JobEvent(job_id=job_id, kind=kind, attempt=token, message=message, data=data))


_INSERT_EVENT = insert(JobEvent.__table__)


def record_events(*, session: Session, events: list[dict[str, Any]]) -> None:
    """Append non-state events (dicts of job_id, attempt, kind, message, data) with one Core INSERT,
    stamped now, in the caller's transaction."""
    now = utcnow()
    session.connection().execute(_INSERT_EVENT, [{"at": now, "data": None, **e} for e in events])


def end_attempt(*, session: Session, job_id: int, owner_id: int, token: int, outcome: str, at: datetime,
                tally: Tally | None = None) -> None:
    """End attempt ``token`` of a job at ``at``, if it has not ended, and count its run time in the
    owner's usage totals: the one place an attempt ends (:func:`end_attempts` for one job). With
    ``tally``, the time goes there for the caller to apply once its other job rows are written
    (:class:`~app.usage.Tally`)."""
    end_attempts(session=session, ended=[(job_id, owner_id, token)], outcome=outcome, at=at, tally=tally)



# Built once (every value bound): building and keying a fresh statement cost more than running it.
_END_ATTEMPTS = (
    update(_ATTEMPTS)
    .where(tuple_(_ATTEMPTS.c.job_id, _ATTEMPTS.c.number).in_(bindparam("kiln_pairs", expanding=True)),
           _ATTEMPTS.c.ended_at.is_(None))
    .values(ended_at=bindparam("kiln_at", type_=_ATTEMPTS.c.ended_at.type),
            outcome=bindparam("kiln_outcome", type_=_ATTEMPTS.c.outcome.type))
    .returning(_ATTEMPTS.c.job_id, _ATTEMPTS.c.number, _ATTEMPTS.c.started_at, _ATTEMPTS.c.device)
)


def end_attempts(*, session: Session, ended: Sequence[tuple[int, int, int]], outcome: str, at: datetime,
                 tally: Tally | None = None) -> None:
    """End each attempt of ``ended`` (job id, owner id, token) at ``at``, if it has not ended, with one
    UPDATE for all, and count their run time in their owners' usage totals (see :func:`end_attempt`)."""
    if not ended:
        return
    owners = {(job_id, token): owner_id for job_id, owner_id, token in ended}
    rows = session.connection().execute(_END_ATTEMPTS, {"kiln_pairs": list(owners), "kiln_at": at,
                                                        "kiln_outcome": outcome}).all()
    usage = tally or Tally()
    for row in rows:
        usage.add(owners[row.job_id, row.number], device=row.device, seconds=(at - row.started_at).total_seconds())
    if tally is None:
        usage.apply(session=session)


def finish(
    *, session: Session, job_id: int, token: int, to: str, error_class: str | None = None,
    message: str | None = None, result: dict[str, Any] | None = None, values: dict[str, Any] | None = None,
) -> None:
    """End the attempt by moving the job to ``to``; refused (StaleAttempt) if the token is stale."""
    if not finish_many(session=session, jobs=[(job_id, token, result, message)], to=to, error_class=error_class,
                       values=values):
        raise StaleAttempt(f"job {job_id}: attempt {token} may no longer finish it")


def finish_many(
    *, session: Session, jobs: Sequence[tuple[int, int, dict[str, Any] | None, str | None]], to: str,
    error_class: str | None = None, values: dict[str, Any] | None = None,
    also: dict[int, dict[str, Any]] | None = None,
) -> list[int]:
    """End each attempt of ``jobs`` (job id, token, result, message) by moving its job to ``to``, as
    :func:`finish` does, one compare-and-set each (all in one statement); returns the ids of the jobs
    that ended (a stale token ends nothing of its job). ``also``: one more event by job id (kind,
    message, data), written with the state events for the jobs that ended."""
    shared = dict(values or {})
    if to == states.SUCCEEDED:
        shared["progress"] = 1.0
    if error_class is not None:
        shared["error_class"] = error_class
    moves = []
    for job_id, token, result, message in jobs:
        own: dict[str, Any] = {}
        if result is not None:
            own["result"] = result
        if error_class is not None:
            own["error_message"] = message
        moves.append(states.Move(job_id, token, own, message=message,
                                 data={"error_class": error_class} if error_class else None))
    if session.connection().dialect.name == "postgresql":
        # One statement: the compare-and-set of every job with its result, the events, the attempts'
        # ends and the usage totals (data-modifying CTEs over the rows that moved).
        moved = states.transition_batch(session, moves, to=to, expect=states.RUNNING, values=shared, also=also,
                                        follow=_ended_and_counted,
                                        params={"kiln_at": utcnow(), "kiln_outcome": error_class or to})
        return [m.move.job_id for m in moved]
    # One compare-and-set statement for the batch (each row on its own token), one executemany for
    # the results of the rows it won, one INSERT for the events.
    moved = states.transition_batch(session, moves, to=to, expect=states.RUNNING, values=shared, also=also)
    if moved:
        now, tally = utcnow(), Tally()
        end_attempts(session=session, ended=[(m.move.job_id, m.owner_id, m.move.token) for m in moved],
                     outcome=error_class or to, at=now, tally=tally)
        tally.apply(session=session)
    return [m.move.job_id for m in moved]


def _ended_and_counted(moved: CTE) -> list[CTE]:
    """PostgreSQL's :func:`end_attempts` over the jobs a finish moved, as CTEs of its statement: the
    attempts' ends (``kiln_at``, ``kiln_outcome``) and their run time added to the owners' usage totals
    (one row per owner, in owner order: after the job and attempt rows, the lock order of
    :class:`~app.usage.Tally`)."""
    at = bindparam("kiln_at", type_=_ATTEMPTS.c.ended_at.type)
    ended = (update(_ATTEMPTS)
             .where(_ATTEMPTS.c.job_id == moved.c.id, _ATTEMPTS.c.number == moved.c.attempts,
                    _ATTEMPTS.c.ended_at.is_(None))
             .values(ended_at=at, outcome=bindparam("kiln_outcome", type_=_ATTEMPTS.c.outcome.type))
             .returning(_ATTEMPTS.c.job_id, _ATTEMPTS.c.started_at, _ATTEMPTS.c.device)
             .cte("kiln_ended"))
    seconds = cast(func.extract("epoch", at - ended.c.started_at), Float())
    on_gpu = ended.c.device == "cuda"  # as usage.device_kind: anything else (NULL too) is CPU time
    per_owner = (select(moved.c.owner_id, literal(0, SmallInteger()), literal(0, Integer()), literal(0, Integer()),
                        func.sum(case((on_gpu, 0.0), else_=seconds)), func.sum(case((on_gpu, seconds), else_=0.0)))
                 .join_from(moved, ended, ended.c.job_id == moved.c.id)
                 .group_by(moved.c.owner_id).order_by(moved.c.owner_id))
    return [ended, _added_to_totals(per_owner, ("cpu_seconds", "gpu_seconds"))]


def _added_to_totals(per_owner, added: tuple[str, ...]) -> CTE:
    """PostgreSQL's :meth:`~app.usage.Tally.apply` as a CTE: ``per_owner`` selects (user id, shard,
    jobs, attempts, cpu seconds, gpu seconds) rows, one per owner in owner order; the ``added``
    columns are added to the owners' totals rows (created if missing)."""
    from sqlalchemy.dialects import postgresql

    totals = UsageTotal.__table__
    upsert = postgresql.insert(totals).from_select(
        ["user_id", "shard", "jobs", "attempts", "cpu_seconds", "gpu_seconds"], per_owner)
    return upsert.on_conflict_do_update(index_elements=[totals.c.user_id, totals.c.shard], set_={
        column: totals.c[column] + upsert.excluded[column] for column in added}).cte("kiln_counted")


def register_model_version(
    *, session: Session, job: Job, checkpoint: Checkpoint, signature: dict[str, Any], metrics: dict[str, Any]
) -> ModelVersion:
    """Register the job's best checkpoint as the next version of the model named after the job."""
    latest = session.execute(
        select(func.max(ModelVersion.version)).where(ModelVersion.owner_id == job.owner_id, ModelVersion.name == job.name)
    ).scalar()
    version = ModelVersion(
        owner_id=job.owner_id, name=job.name, version=(latest or 0) + 1, job_id=job.id,
        checkpoint_id=checkpoint.id, arch=job.spec["model"]["arch"], task=signature.get("task", ""),
        signature=signature, metrics=metrics, input_schema=model_registry.input_schema(signature),
        lineage=model_registry.lineage(session=session, job=job),
    )
    session.add(version)
    session.flush()
    job.model_version_id = version.id
    return version
