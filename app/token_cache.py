"""A short-lived, in-process cache of what bearer tokens resolve to, so most API requests
authenticate without a query.

An entry holds a valid token's id, expiry and last recorded use, and its user's id, email, role
and created time (never a password hash or a webhook secret: those load from the database when a
request reads them). Bound on staleness:

- any change to a user or a token that this process commits through a session's unit of work
  (revoking a token, a role change, disabling a user, a new token) empties the cache at its flush
  and again at its commit, so this process refuses a revoked token from the next request on;
- a change made by another process (another web worker, another host, the ``kiln`` CLI) is seen
  here once the entry is older than ``token_cache_seconds`` (``KILN_TOKEN_CACHE_SECONDS``, 0 turns
  the cache off). A token's expiry is checked at every use, cached or not.

Code that changes users or tokens with a bulk ``update()``/``delete()`` statement instead of the
unit of work must call :func:`clear` itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.models import ApiToken, User

MAX_ENTRIES = 10_000
_CHANGED = "kiln_auth_changed"


@dataclass
class Entry:
    """What one valid token resolved to when it was looked up."""

    token_id: int
    expires_at: datetime | None
    last_used_at: datetime | None
    user: dict[str, Any]  # the user's id, email, role, active, created_at
    fetched_at: float = field(default_factory=time.monotonic)  # when it was looked up


class TokenCache:
    """Entries by token digest; a generation counter keeps a lookup that raced a change from storing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self.generation = 0

    def get(self, digest: str, max_age: float) -> Entry | None:
        """The entry for ``digest`` if it is younger than ``max_age`` seconds."""
        entry = self._entries.get(digest)
        if entry is None or time.monotonic() - entry.fetched_at >= max_age:
            return None
        return entry

    def put(self, digest: str, entry: Entry, generation: int) -> None:
        """Keep ``entry`` unless the cache was cleared since ``generation`` was read (the lookup may be stale)."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = entry

    def clear(self) -> None:
        """Forget every entry (and any lookup still in flight)."""
        with self._lock:
            self.generation += 1
            self._entries.clear()


CACHE = TokenCache()


def clear() -> None:
    """Forget every cached token: call after changing users or tokens without the unit of work."""
    CACHE.clear()


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context) -> None:
    if any(isinstance(obj, (User, ApiToken)) for group in (session.new, session.dirty, session.deleted)
           for obj in group):
        session.info[_CHANGED] = True
        CACHE.clear()


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    # Cleared again once the change is visible: a lookup that read the old row between the flush
    # and the commit cannot have stored it (its generation is older), nor can a later one.
    if session.info.pop(_CHANGED, False):
        CACHE.clear()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)
