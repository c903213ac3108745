"""The wake-up message after a committed change, shared by the API and the pages."""

from __future__ import annotations

from app import queue
from app.jobs import service
from app.web.context import db, settings


def publish(job, *, recorded: bool) -> None:
    """Publish ``job``'s wake-up message after its transaction committed.

    ``recorded``: the committed transaction already stamped ``published_at`` (a submit, one write
    transaction); if the broker refuses the message the stamp is cleared so the reconciler
    republishes at its next pass. Otherwise (retry, resume) the stamp is written once published.
    """
    sent = queue.publish(settings(), job_id=job.id, kind=job.kind, token=job.attempts, priority=job.priority)
    if sent and not recorded:
        service.mark_published(session=db(), job_id=job.id)
        db().commit()
    elif not sent and recorded:
        service.mark_unpublished(session=db(), job_id=job.id)
        db().commit()
