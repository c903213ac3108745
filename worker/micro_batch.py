"""Micro-batching: one forward pass for several queued predictions of the same model version.

The prediction task, in the transaction that claims its own job, claims up to
``max_batch_size - 1`` further queued predictions of the same model version straight from the
database (each with the conditional UPDATE of :func:`app.jobs.attempts.claim`, so each gets its
own attempt and fencing token; rows another worker's claim holds are skipped), runs all their inputs as one forward pass, and finishes them in one transaction, each
job with its own token (one compare-and-set each). Their own broker messages arrive later, find
the jobs unclaimable and are dropped, as duplicates are. A failure is per job: a job's bad inputs fail that job, a stale token refuses only that
job's finish, and a failed forward pass fails each job through its own attempt.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass

from sqlalchemy import bindparam, or_, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.finish_signal import notify_finished
from app.jobs import attempts, states
from app.jobs.errors import JobFailure, SpecError, UserError
from app.jobs.schemas import PredictSpec, parse_spec
from app.models import Job, utcnow
from app.settings import Settings
from app.usage import Tally
from worker.recorder import Recorder

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One claimed job of a batch: its spec (None if unreadable) and its attempt's recorder."""

    job_id: int
    spec: PredictSpec | None
    recorder: Recorder
    problem: JobFailure | None = None


def batch_size(settings: Settings, max_batch_size: int | None) -> int:
    """The most jobs one forward pass takes: the alias's or version's ``max_batch_size``, else the setting."""
    return settings.predict_max_batch_size if max_batch_size is None else max_batch_size


def claim_more(*, lead_id: int, model_version_id: int, worker: str, settings: Settings,
               max_batch_size: int | None = None, max_delay_ms: int | None = None,
               taken: list[tuple] | None = None) -> list[Member]:
    """Claim up to ``max_batch_size - 1`` queued predictions of the model version (may be none).

    The limits default to ``predict_max_batch_size`` and ``predict_max_delay_ms``. A batch that
    found company but is not full looks once more after ``max_delay_ms``; a lone request (nothing
    else queued for its model) runs at once: with no requests arriving together there is no batch
    to wait for, and under load the queue fills while the worker is busy. ``taken``: what
    :func:`take_company` took in the lead's own claim transaction (the first look), if it looked.
    """
    delay = settings.predict_max_delay_ms if max_delay_ms is None else max_delay_ms
    limit = batch_size(settings, max_batch_size) - 1
    members: list[Member] = _members(taken, lead_id, worker, settings) if taken is not None else []
    if limit <= 0:
        return members
    for look in range(1 if taken is not None else 0, 2):
        if look == 1:
            if delay <= 0 or not members or len(members) >= limit:
                break
            time.sleep(delay / 1000)
        with session_scope(settings.database_url, write=True) as session:
            more = take_company(session=session, lead_id=lead_id, model_version_id=model_version_id,
                                limit=limit - len(members), worker=worker, settings=settings)
        members += _members(more, lead_id, worker, settings)
        if len(members) >= limit:
            break
    return members


# Built once, values bound per call: building and keying the statement cost more than running it.
# SKIP LOCKED (PostgreSQL; SQLite's write transactions run one at a time): rows another worker's
# claim transaction holds are left to it, so two claims taking company never wait on each other.
_COMPANY = (
    select(Job.id, Job.attempts, Job.spec)
    .where(Job.state == states.QUEUED, Job.kind == "predict", Job.model_version_id == bindparam("model_version_id"),
           Job.id != bindparam("lead_id"), Job.cancel_requested_at.is_(None),
           or_(Job.not_before.is_(None), Job.not_before <= bindparam("now")))
    .order_by(Job.id).limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)


def take_company(*, session: Session, lead_id: int, model_version_id: int | None, limit: int, worker: str,
                 settings: Settings, tally: Tally | None = None) -> list[tuple]:
    """In the caller's write transaction, claim up to ``limit`` queued predictions of the model
    version for the lead's batch (each with the conditional UPDATE of :func:`app.jobs.attempts.claim`,
    so each gets its own attempt and fencing token); returns (job id, token, lease owner, raw spec)
    of each claimed one, for :func:`claim_more` once the transaction committed. With ``tally``, their
    usage totals go there for the caller to apply (after its other job rows: the lock order)."""
    if limit <= 0 or model_version_id is None:
        return []
    rows = session.execute(_COMPANY, {"model_version_id": model_version_id, "lead_id": lead_id, "now": utcnow(),
                                      "limit": limit * 2}).all()
    # Batch-file predictions run on their own, in chunks; embeddings, explained predictions and text
    # generation (a prompt, token by token) run alone.
    rows = [r for r in rows if isinstance(r.spec, dict) and not r.spec.get("dataset") and r.spec.get("prompt") is None
            and r.spec.get("output", "prediction") == "prediction" and not r.spec.get("explain")][:limit]
    if not rows:
        return []
    from worker.ml.devices import device_kind  # torch loads only where predictions run

    specs = {row.id: row.spec for row in rows}
    return [(a.job_id, a.number, attempts.lease_owner(a), specs[a.job_id]) for a in attempts.claim_many(
        session=session, jobs=[(row.id, row.attempts) for row in rows], worker=worker, host=socket.gethostname(),
        pid=os.getpid(), lease_seconds=settings.lease_seconds, device=device_kind("auto"), tally=tally)]


def _members(claimed: list[tuple], lead_id: int, worker: str, settings: Settings) -> list[Member]:
    """The batch members of jobs claimed by :func:`take_company` (committed), each with its recorder."""
    members = []
    for job_id, number, owner, raw in claimed:
        spec, problem = None, None
        try:
            spec = parse_spec(raw)
        except SpecError as exc:
            problem = UserError(f"the stored spec is no longer valid: {exc}")
        runtime = spec.max_attempt_runtime_s if spec is not None else 600
        recorder = Recorder(job_id=job_id, token=number, owner=owner, settings=settings, keep_last=1,
                            max_attempt_runtime_s=runtime).start()
        log.info("event=claimed job_id=%s attempt=%s worker=%s batched_with=%s", job_id, number, worker, lead_id)
        members.append(Member(job_id, spec, recorder, problem))
    return members


def run(lead: Member, others: list[Member], *, model: tuple[str, str, str], load, settings: Settings,
        fail) -> str:
    """Predict for every member in one forward pass and finish each; returns the lead job's outcome.

    ``load`` reads the model's checkpoint bytes (on a cache miss); ``fail(job_id, token, recorder,
    error_class, message, retryable=, detail=)`` ends one attempt with a classified failure.
    """
    from worker.ml import prediction

    model_ref, _, digest = model
    members = [lead] + others
    ready = [m for m in members if m.problem is None]
    batch_id = secrets.token_hex(6)
    outcomes: dict[int, str] = {}
    try:
        outcome = prediction.predict_many(load, [list(m.spec.inputs) for m in ready], device="auto", digest=digest)
    except JobFailure as exc:
        for m in ready:
            m.problem = exc
    except Exception as exc:  # noqa: BLE001 - classified as internal for every job of the batch
        detail = traceback.format_exc()
        log.error("event=internal_error batch_id=%s jobs=%s\n%s", batch_id, [m.job_id for m in ready], detail)
        for m in ready:
            m.problem = JobFailure(f"internal error ({type(exc).__name__}); operators can find the traceback "
                                   "in the job's log")
            m.problem.detail = detail
    else:
        done = []
        for m, result in zip(ready, outcome.results):
            if isinstance(result, UserError):
                m.problem = result
            else:
                done.append((m, result))
        outcomes.update(_finish_all(done, model_ref, batch_id, len(members), outcome.forward_passes, settings))
    for m in members:
        if m.problem is not None:
            outcomes[m.job_id] = fail(m.job_id, m.recorder.token, m.recorder, m.problem.failure_class,
                                      m.problem.message, retryable=m.problem.retryable,
                                      detail=getattr(m.problem, "detail", None))
    for m in others:
        m.recorder.close()
    notify_finished(settings, *(m.job_id for m in others))  # the lead's is sent by the runner
    for m in others:
        log.info("event=batched_job_done job_id=%s attempt=%s outcome=%s", m.job_id, m.recorder.token,
                 outcomes.get(m.job_id))
    return outcomes[lead.job_id]


def _finish_all(done: list[tuple[Member, dict]], model_ref: str, batch_id: str, size: int, passes: int,
                settings: Settings) -> dict[int, str]:
    """Finish the members that got a result, in one transaction, each with its own token: a stale
    one is refused alone (its compare-and-set matches nothing, so nothing of it is written)."""
    from worker.runner import _finite

    for m, _ in done:
        # Off the heartbeat first: a lease renewal racing the finish would find the job ended.
        # The finish takes milliseconds; the lease runs for ``lease_seconds``.
        m.recorder.close()
    if not done:
        return {}
    batched = {m.job_id: dict(kind="batched", message=f"predicted in a batch of {size} job(s), {passes} forward pass(es)",
                              data={"batch_id": batch_id, "batch_size": size, "forward_passes": passes})
               for m, _ in done}
    with session_scope(settings.database_url, write=True) as session:
        # One transaction, one statement per step for the whole batch: the compare-and-set of every
        # job (each on its own token), their results, their state and "batched" events (one
        # INSERT), the attempts' ends, the usage totals.
        ended = set(attempts.finish_many(session=session, to=states.SUCCEEDED, also=batched, jobs=[
            (m.job_id, m.recorder.token, _finite({"model": model_ref, **result}),
             f"predicted {len(m.spec.inputs)} inputs with {model_ref}") for m, result in done]))
        outcomes: dict[int, str] = {}
        for m, _ in done:
            if m.job_id not in ended:
                log.warning("event=stale_attempt job_id=%s attempt=%s", m.job_id, m.recorder.token)
                attempts.record_refused_write(session=session, job_id=m.job_id, token=m.recorder.token,
                                              what="finish", detail="the attempt may no longer finish the job")
                outcomes[m.job_id] = "stale"
                continue
            outcomes[m.job_id] = states.SUCCEEDED
    return outcomes
