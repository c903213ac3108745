"""Per-user quotas: queued + running jobs, compute seconds per UTC day, storage bytes (0 = unlimited).

Checked by the services (job submit, dataset store), so the API and the pages refuse alike;
a refusal is :class:`QuotaExceeded`, which names the quota, its limit and the current use.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import usage
from app.jobs.errors import KilnError
from app.models import User, utcnow
from app.settings import Settings


class QuotaExceeded(KilnError):
    """A request that would go past a user's quota; ``status`` is its HTTP answer (429 or 413)."""

    def __init__(self, quota: str, limit: int, used: float, status: int, message: str):
        super().__init__(message)
        self.quota, self.limit, self.used, self.status, self.message = quota, limit, used, status, message


def check_submit(*, session: Session, user: User, settings: Settings) -> None:
    """Refuse a new job past the active-jobs or the daily compute quota (429 each)."""
    if settings.quota_active_jobs:
        active = usage.active_jobs(session=session, user_id=user.id)
        if active >= settings.quota_active_jobs:
            raise QuotaExceeded("active_jobs", settings.quota_active_jobs, active, 429,
                                f"you have {active} queued or running jobs; the limit is "
                                f"{settings.quota_active_jobs}: wait for one to end or cancel one")
    if settings.quota_compute_seconds_per_day:
        now = utcnow()
        used = round(usage.user_compute_seconds(session=session, user_id=user.id, start=usage.day_start(now),
                                                end=now), 1)
        if used >= settings.quota_compute_seconds_per_day:
            raise QuotaExceeded("compute_seconds_per_day", settings.quota_compute_seconds_per_day, used, 429,
                                f"your jobs have run {used:g} s today (UTC); the daily limit is "
                                f"{settings.quota_compute_seconds_per_day} s")


def check_storage(*, session: Session, user: User, settings: Settings, adding: int) -> None:
    """Refuse a file that would take the user's storage (checkpoints + datasets) past the quota (413)."""
    if not settings.quota_storage_bytes:
        return
    used = usage.storage_bytes(session=session, user_id=user.id)
    if used + adding > settings.quota_storage_bytes:
        raise QuotaExceeded("storage_bytes", settings.quota_storage_bytes, used, 413,
                            f"you store {used} bytes; {adding} more would pass the limit of "
                            f"{settings.quota_storage_bytes} bytes: delete datasets or jobs' checkpoints")
