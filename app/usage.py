"""Usage per user and per job: compute seconds, jobs and storage bytes (the API's ``/usage`` and the quotas).

Each attempt records the kind of device it ran on when it was claimed: its run time counts as
``gpu_seconds`` on ``cuda``, else as ``cpu_seconds`` (attempts from before the device was recorded
count as CPU time).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.accounts import require_admin
from app.jobs.states import QUEUED, RUNNING
from app.models import Attempt, Checkpoint, Dataset, Job, UsageTotal, User, utcnow

DEVICE_NOTE = ("an attempt's run time counts as gpu_seconds when it ran on a CUDA device, else as cpu_seconds "
               "(attempts recorded before the device was, as cpu_seconds)")


def device_kind(device: str | None) -> str:
    """``gpu`` for an attempt that ran on CUDA, else ``cpu`` (also for one whose device was not recorded)."""
    return "gpu" if device == "cuda" else "cpu"


# Rows a user's totals are spread over by the submits (job id modulo this); readers sum them.
SHARDS = 16


class Tally:
    """Changes to users' :class:`~app.models.UsageTotal` rows, written together by :meth:`apply`.

    Writers call it after the job and attempt rows of their transaction, and it writes in (user id,
    shard) order: every transaction then locks job rows before totals rows, so two of them (the reaper
    ending many attempts in one, a worker finishing one of those) cannot each wait for the other.
    A submit writes to the shard of its job id, so one user's concurrent submits do not queue on
    one row's lock until each other's commit; other writers use shard 0.
    """

    def __init__(self) -> None:
        self._deltas: dict[tuple[int, int], list[float]] = {}  # (owner id, shard) -> [jobs, attempts, cpu s, gpu s]

    def add(self, owner_id: int, *, jobs: int = 0, attempts: int = 0, device: str | None = None,
            seconds: float = 0.0, shard: int = 0) -> Tally:
        """Count ``jobs`` submitted, ``attempts`` started and ``seconds`` of an ended attempt run on ``device``."""
        delta = self._deltas.setdefault((owner_id, shard), [0, 0, 0.0, 0.0])
        delta[0] += jobs
        delta[1] += attempts
        delta[2 if device_kind(device) == "cpu" else 3] += seconds
        return self

    def apply(self, *, session: Session) -> None:
        """Add the changes to the totals (one upsert per user and shard, in that order) and forget them."""
        if not self._deltas:
            return
        session.flush()  # the caller's job and attempt rows first (the lock order above)
        conn = session.connection()
        stmt = _upsert(conn.dialect.name)
        for owner_id, shard in sorted(self._deltas):
            jobs, attempts, cpu, gpu = self._deltas[owner_id, shard]
            conn.execute(stmt, {"user_id": owner_id, "shard": shard, "jobs": jobs, "attempts": attempts,
                                "cpu_seconds": cpu, "gpu_seconds": gpu})
        self._deltas.clear()


def count_submit(*, connection: Connection, owner_id: int, job_id: int) -> None:
    """One more job on its owner's shard of ``job_id``: a submit's upsert, on the connection of its
    Core statements, after its job row (the lock order :class:`Tally` keeps; nothing to flush first)."""
    connection.execute(_upsert(connection.dialect.name), {"user_id": owner_id, "shard": job_id % SHARDS, "jobs": 1,
                                                          "attempts": 0, "cpu_seconds": 0.0, "gpu_seconds": 0.0})


@lru_cache(maxsize=4)
def _upsert(dialect_name: str):
    """The totals upsert for one dialect, built once: a fresh ``insert().values().on_conflict_do_update()``
    per call cost more CPU than the rest of a submit's SQL together (its ``excluded`` columns and cache
    key are built anew each time)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    columns = UsageTotal.__table__.c
    stmt = dialect.insert(UsageTotal.__table__).values(
        user_id=bindparam("user_id"), shard=bindparam("shard"), jobs=bindparam("jobs"), attempts=bindparam("attempts"),
        cpu_seconds=bindparam("cpu_seconds"), gpu_seconds=bindparam("gpu_seconds"))
    return stmt.on_conflict_do_update(index_elements=[columns.user_id, columns.shard], set_={
        "jobs": columns.jobs + stmt.excluded.jobs, "attempts": columns.attempts + stmt.excluded.attempts,
        "cpu_seconds": columns.cpu_seconds + stmt.excluded.cpu_seconds,
        "gpu_seconds": columns.gpu_seconds + stmt.excluded.gpu_seconds})


def _overlap(started: datetime, ended: datetime | None, start: datetime | None, end: datetime) -> float:
    """Seconds of ``started..ended`` (a running attempt: up to ``end``) inside ``start..end``."""
    lo = max(started, start) if start is not None else started
    hi = min(ended or end, end)
    return max(0.0, (hi - lo).total_seconds())


def compute_seconds(*, session: Session, user_ids: list[int] | None, start: datetime | None,
                    end: datetime, by_device: bool = False) -> dict[tuple, float]:
    """Run time of attempts inside ``start..end``, keyed by ``(owner id, job id)`` — with
    ``by_device``, by ``(owner id, job id, "cpu" | "gpu")``; None means every user."""
    stmt = (select(Job.owner_id, Job.id, Attempt.started_at, Attempt.ended_at, Attempt.device)
            .join(Attempt, Attempt.job_id == Job.id).where(Attempt.started_at < end))
    if start is not None:
        stmt = stmt.where(or_(Attempt.ended_at.is_(None), Attempt.ended_at > start))
    if user_ids is not None:
        stmt = stmt.where(Job.owner_id.in_(user_ids))
    seconds: dict[tuple, float] = defaultdict(float)
    for owner_id, job_id, started, ended, device in session.execute(stmt):
        key = (owner_id, job_id, device_kind(device)) if by_device else (owner_id, job_id)
        seconds[key] += _overlap(started, ended, start, end)
    return seconds


def user_compute_seconds(*, session: Session, user_id: int, start: datetime, end: datetime | None = None) -> float:
    """One user's run time inside ``start..end`` (now by default), running attempts included."""
    per_job = compute_seconds(session=session, user_ids=[user_id], start=start, end=end or utcnow())
    return sum(per_job.values())


def storage_bytes(*, session: Session, user_id: int) -> int:
    """Bytes a user's checkpoints and uploaded datasets take in storage now."""
    checkpoints = session.execute(
        select(func.coalesce(func.sum(Checkpoint.size_bytes), 0)).join(Job, Job.id == Checkpoint.job_id)
        .where(Job.owner_id == user_id)).scalar_one()
    datasets = session.execute(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == user_id)).scalar_one()
    return int(checkpoints) + int(datasets)


def active_jobs(*, session: Session, user_id: int) -> int:
    """A user's queued and running jobs."""
    return session.execute(select(func.count()).select_from(Job).where(
        Job.owner_id == user_id, Job.state.in_((QUEUED, RUNNING)))).scalar_one()


def report(*, session: Session, actor: User, start: datetime | None, end: datetime | None,
           user_id: int | None = None) -> dict[str, Any]:
    """Usage over ``start..end`` (end defaults to now) per user and per job.

    Others see only themselves; an admin sees every user, or one with ``user_id``. ``jobs`` counts
    jobs created in the range; ``cpu_seconds`` and ``gpu_seconds`` the part of each attempt's run inside it, by its device;
    storage is the bytes held now (checkpoints per job, plus datasets).
    """
    end = end or utcnow()
    if user_id is not None and user_id != actor.id:
        require_admin(actor)
    ids = [user_id] if user_id is not None else (None if actor.is_admin else [actor.id])
    users_stmt = select(User.id, User.email).order_by(User.id)
    if ids is not None:
        users_stmt = users_stmt.where(User.id.in_(ids))
    users = {uid: {"user_id": uid, "email": email, "cpu_seconds": 0.0, "gpu_seconds": 0.0, "jobs": 0,
                   "storage_bytes": {"checkpoints": 0, "datasets": 0, "total": 0}, "per_job": {}}
             for uid, email in session.execute(users_stmt)}

    def job_entry(owner_id: int, job_id: int, name: str) -> dict[str, Any]:
        return users[owner_id]["per_job"].setdefault(job_id, {
            "job_id": job_id, "name": name, "cpu_seconds": 0.0, "gpu_seconds": 0.0, "checkpoint_bytes": 0})

    spent = compute_seconds(session=session, user_ids=ids, start=start, end=end, by_device=True)
    for (owner_id, job_id, kind), seconds in spent.items():
        if owner_id in users:
            users[owner_id][f"{kind}_seconds"] += seconds
            job_entry(owner_id, job_id, "")[f"{kind}_seconds"] += seconds
    created = select(Job.owner_id, func.count()).where(Job.created_at < end).group_by(Job.owner_id)
    if start is not None:
        created = created.where(Job.created_at >= start)
    for owner_id, n in session.execute(created):
        if owner_id in users:
            users[owner_id]["jobs"] = n
    ckpt = (select(Job.owner_id, Job.id, func.sum(Checkpoint.size_bytes))
            .join(Checkpoint, Checkpoint.job_id == Job.id).group_by(Job.owner_id, Job.id))
    for owner_id, job_id, size in session.execute(ckpt):
        if owner_id in users:
            users[owner_id]["storage_bytes"]["checkpoints"] += int(size or 0)
            job_entry(owner_id, job_id, "")["checkpoint_bytes"] = int(size or 0)
    for owner_id, size in session.execute(select(Dataset.owner_id, func.sum(Dataset.size_bytes)).group_by(Dataset.owner_id)):
        if owner_id in users:
            users[owner_id]["storage_bytes"]["datasets"] = int(size or 0)
    job_ids = [j for u in users.values() for j in u["per_job"]]
    for job_id, name in session.execute(select(Job.id, Job.name).where(Job.id.in_(job_ids))) if job_ids else ():
        for u in users.values():
            if job_id in u["per_job"]:
                u["per_job"][job_id]["name"] = name
    items = []
    for u in users.values():
        u["storage_bytes"]["total"] = u["storage_bytes"]["checkpoints"] + u["storage_bytes"]["datasets"]
        u["cpu_seconds"], u["gpu_seconds"] = round(u["cpu_seconds"], 3), round(u["gpu_seconds"], 3)
        per_job = sorted(u.pop("per_job").values(), key=lambda j: j["job_id"])
        for j in per_job:
            j["cpu_seconds"], j["gpu_seconds"] = round(j["cpu_seconds"], 3), round(j["gpu_seconds"], 3)
        items.append(u | {"per_job": per_job})
    return {"from": start.isoformat() if start else None, "to": end.isoformat(), "note": DEVICE_NOTE,
            "users": items}


def day_start(now: datetime | None = None) -> datetime:
    """Midnight UTC of today (the compute quota's day)."""
    now = now or utcnow()
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


