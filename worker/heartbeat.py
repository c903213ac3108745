"""One heartbeat thread per worker process: it renews the lease of every attempt running here.

Recorders register their attempt when it starts and unregister when it ends; the thread, started
lazily by the first registration (and again in a forked child, where the parent's thread does
not exist), calls each recorder's :meth:`~worker.recorder.Recorder.beat` when its lease renewal
or its queued metrics are due. A job costs no thread start or join of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

THREAD_NAME = "kiln-heartbeat"
# Queued metrics reach the database at least this often (the lease renews at its own interval).
FLUSH_SECONDS = 0.5
# How long the thread sleeps with nothing registered before it looks again.
IDLE_SECONDS = 60.0


class Beating(Protocol):
    """What the heartbeat thread needs from a registered attempt."""

    def due(self, now: float) -> bool:
        """Whether a renewal or a flush is due at monotonic time ``now``."""

    def beat(self) -> None:
        """Flush queued reports and renew the lease in one fenced transaction; never raises."""

    def interval(self) -> float:
        """Seconds between lease renewals."""


class HeartbeatService:
    """The process's heartbeat thread and the attempts it keeps alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered: list[Beating] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def register(self, attempt: Beating) -> None:
        """Start renewing ``attempt``'s lease (starting the thread if this process has none yet)."""
        with self._lock:
            if attempt not in self._registered:
                self._registered.append(attempt)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
                self._thread.start()
        self._wake.set()

    def unregister(self, attempt: Beating) -> None:
        """Stop renewing ``attempt``'s lease (the thread stays, for the process's next job)."""
        with self._lock:
            if attempt in self._registered:
                self._registered.remove(attempt)

    def _loop(self) -> None:
        while True:
            with self._lock:
                registered = list(self._registered)
            now = time.monotonic()
            for attempt in registered:
                if attempt.due(now):
                    try:
                        attempt.beat()
                    except Exception as exc:  # noqa: BLE001 - one attempt's trouble must not stop the others'
                        log.warning("event=heartbeat_failed error=%r", exc)
            wait = min([FLUSH_SECONDS] + [a.interval() for a in registered]) if registered else IDLE_SECONDS
            self._wake.wait(wait)
            self._wake.clear()


SERVICE = HeartbeatService()
