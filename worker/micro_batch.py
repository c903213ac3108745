"""Micro-batching: one forward pass for several queued predictions of the same model version.

The prediction task, once it has claimed its own job, claims up to ``max_batch_size - 1`` further
queued predictions of the same model version straight from the database (each with the
conditional UPDATE of :func:`app.jobs.attempts.claim`, so each gets its own attempt and fencing
token), runs all their inputs as one forward pass, and finishes them in one transaction, each job
through the state machine with its own token. Their own broker messages arrive later, find the
jobs unclaimable and are dropped, as duplicates are. A failure is per job: a job's bad inputs
fail that job, a stale token refuses only that job's finish (the shared transaction rolls back
and each job finishes on its own), and a failed forward pass fails each job through its own attempt.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass

from sqlalchemy import or_, select

from app.db import session_scope
from app.finish_signal import notify_finished
from app.jobs import attempts, states
from app.jobs.errors import JobFailure, SpecError, StaleAttempt, UserError
from app.jobs.schemas import PredictSpec, parse_spec
from app.models import Job, utcnow
from app.settings import Settings
from worker.recorder import Recorder

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One claimed job of a batch: its spec (None if unreadable) and its attempt's recorder."""

    job_id: int
    spec: PredictSpec | None
    recorder: Recorder
    problem: JobFailure | None = None


def claim_more(*, lead_id: int, model_version_id: int, worker: str, settings: Settings,
               max_batch_size: int | None = None, max_delay_ms: int | None = None) -> list[Member]:
    """Claim up to ``max_batch_size - 1`` queued predictions of the model version (may be none).

    The limits default to ``predict_max_batch_size`` and ``predict_max_delay_ms``. A batch that
    found company but is not full looks once more after ``max_delay_ms``; a lone request (nothing
    else queued for its model) runs at once: with no requests arriving together there is no batch
    to wait for, and under load the queue fills while the worker is busy.
    """
    size = settings.predict_max_batch_size if max_batch_size is None else max_batch_size
    delay = settings.predict_max_delay_ms if max_delay_ms is None else max_delay_ms
    limit = size - 1
    members: list[Member] = []
    if limit <= 0:
        return members
    for look in range(2):
        if look == 1:
            if delay <= 0 or not members:
                break
            time.sleep(delay / 1000)
        members += _claim_queued(lead_id, model_version_id, limit - len(members), worker, settings)
        if len(members) >= limit:
            break
    return members


def _claim_queued(lead_id: int, model_version_id: int, limit: int, worker: str, settings: Settings) -> list[Member]:
    now = utcnow()
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Job.id, Job.attempts, Job.spec)
            .where(Job.state == states.QUEUED, Job.kind == "predict", Job.model_version_id == model_version_id,
                   Job.id != lead_id, Job.cancel_requested_at.is_(None),
                   or_(Job.not_before.is_(None), Job.not_before <= now))
            .order_by(Job.id).limit(limit * 2)
        ).all()
    # Batch-file predictions run on their own, in chunks; embeddings, explained predictions and text
    # generation (a prompt, token by token) run alone.
    rows = [r for r in rows if isinstance(r.spec, dict) and not r.spec.get("dataset") and r.spec.get("prompt") is None
            and r.spec.get("output", "prediction") == "prediction" and not r.spec.get("explain")][:limit]
    if not rows:
        return []
    from worker.ml.devices import device_kind  # torch loads only where predictions run

    claimed: list[tuple[int, int, str, dict]] = []
    with session_scope(settings.database_url, write=True) as session:
        for row in rows:
            attempt = attempts.claim(session=session, job_id=row.id, token=row.attempts, worker=worker,
                                     host=socket.gethostname(), pid=os.getpid(), lease_seconds=settings.lease_seconds,
                                     device=device_kind("auto"))
            if attempt is not None:
                claimed.append((row.id, attempt.number, attempts.lease_owner(attempt), row.spec))
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
        batch = {"batch_id": batch_id, "batch_size": len(members), "forward_passes": outcome.forward_passes}
        outcomes.update(_finish_together(done, model_ref, batch, settings))
    for m in members:
        if m.problem is not None:
            outcomes[m.job_id] = fail(m.job_id, m.recorder.token, m.recorder, m.problem.failure_class,
                                      m.problem.message, retryable=m.problem.retryable,
                                      detail=getattr(m.problem, "detail", None))
    for m in others:
        m.recorder.close()
        log.info("event=batched_job_done job_id=%s attempt=%s outcome=%s", m.job_id, m.recorder.token,
                 outcomes.get(m.job_id))
    if others:
        notify_finished(settings, *(m.job_id for m in others))  # the lead's comes from the runner
    return outcomes[lead.job_id]


def _finish_together(done: list[tuple[Member, dict]], model_ref: str, batch: dict, settings: Settings) -> dict[int, str]:
    """Finish the members that got a result in one transaction, each through the state machine with
    its own token; if one token turns out stale, that rolls back, and each is finished on its own,
    so the stale one alone is refused."""
    if len(done) > 1:
        for m, _ in done:
            m.recorder.close()  # no lease renewal runs inside the shared transaction; the token is the fence
        try:
            with session_scope(settings.database_url, write=True) as session:
                for m, result in done:
                    _record_finish(session, m, result, model_ref, batch)
            return {m.job_id: states.SUCCEEDED for m, _ in done}
        except StaleAttempt:
            log.info("event=batch_finish_split batch_id=%s jobs=%s", batch["batch_id"], [m.job_id for m, _ in done])
    return {m.job_id: _finish(m, result, model_ref, batch) for m, result in done}


def _finish(member: Member, result: dict, model_ref: str, batch: dict) -> str:
    """Finish one member with its own token in its own transaction; a stale one is refused alone."""
    try:
        with member.recorder.final("finish") as session:
            _record_finish(session, member, result, model_ref, batch)
    except StaleAttempt as exc:
        log.warning("event=stale_attempt job_id=%s attempt=%s detail=%s", member.job_id, member.recorder.token, exc)
        return "stale"
    return states.SUCCEEDED


def _record_finish(session, member: Member, result: dict, model_ref: str, batch: dict) -> None:
    """The ``batched`` event and the move to succeeded, fenced by the member's token (StaleAttempt if stale)."""
    from worker.runner import _finite

    attempts.record_event(
        session=session, job_id=member.job_id, token=member.recorder.token, kind="batched",
        message=f"predicted in a batch of {batch['batch_size']} job(s), {batch['forward_passes']} forward pass(es)",
        data=batch,
    )
    attempts.finish(session=session, job_id=member.job_id, token=member.recorder.token, to=states.SUCCEEDED,
                    result=_finite({"model": model_ref, **result}),
                    message=f"predicted {len(member.spec.inputs)} inputs with {model_ref}")
