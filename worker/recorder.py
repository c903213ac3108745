"""The recorder: a running attempt's fenced link to the database (metrics, checkpoints, lease).

It implements ``worker.ml.hooks.TrainingHooks``. A heartbeat thread renews the lease and reads
the persisted cancel flag, so a stop request reaches the training loop within one heartbeat.
"""

from __future__ import annotations

import contextvars
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from app import storage
from app.db import session_scope
from app.jobs import attempts
from app.jobs.errors import StaleAttempt, UserError
from app.settings import Settings

log = logging.getLogger(__name__)


class Recorder:
    """Writes one attempt's progress, always under its fencing token and lease owner."""

    def __init__(self, *, job_id: int, token: int, owner: str, settings: Settings, keep_last: int,
                 max_attempt_runtime_s: float):
        self.job_id, self.token, self.owner, self.settings = job_id, token, owner, settings
        self.keep_last = keep_last
        # Per attempt by design: a requeued or retried attempt gets a fresh budget and continues.
        self.deadline = time.monotonic() + max_attempt_runtime_s
        self.best_checkpoint_id: int | None = None
        self.last_checkpoint_id: int | None = None
        self._reason: str | None = None
        self._progress_written = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Recorder":
        """Start renewing the lease in the background, in the caller's logging context."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._heartbeat,),
                                        name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the heartbeat thread."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to stop at its next step check (first reason wins)."""
        if self._reason is None:
            self._reason = reason

    @contextmanager
    def _fenced(self, what: str) -> Iterator[Session]:
        """One short transaction for one fenced write; a refused write leaves a durable trace."""
        try:
            with session_scope(self.settings.database_url) as session:
                yield session
        except StaleAttempt as exc:
            # The refused transaction is rolled back by now: record the refusal in a new one.
            log.warning("event=write_refused job_id=%s attempt=%s what=%r", self.job_id, self.token, what)
            try:
                with session_scope(self.settings.database_url) as session:
                    attempts.record_refused_write(session=session, job_id=self.job_id, token=self.token,
                                                  what=what, detail=str(exc))
            except Exception as err:  # noqa: BLE001 - the refusal itself must still reach the caller
                log.warning("event=write_refused_not_recorded job_id=%s attempt=%s error=%r",
                            self.job_id, self.token, err)
            raise

    def _heartbeat(self) -> None:
        interval = max(0.2, min(self.settings.heartbeat_seconds, self.settings.lease_seconds / 3))
        while not self._done.wait(interval):
            try:
                with self._fenced("lease renewal") as session:
                    job = attempts.renew(
                        session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                        lease_seconds=self.settings.lease_seconds,
                    )
                    if job.cancel_requested_at is not None:
                        self.request_stop("cancel")
                    elif job.pause_requested_at is not None:
                        self.request_stop("pause")
            except StaleAttempt:
                log.warning("event=lease_lost job_id=%s attempt=%s", self.job_id, self.token)
                self.request_stop("stale")
                return
            except Exception as exc:  # noqa: BLE001 - a database blip must not kill the heartbeat
                log.warning("event=heartbeat_failed job_id=%s attempt=%s error=%r", self.job_id, self.token, exc)

    # -- TrainingHooks -----------------------------------------------------------------------

    def stop_reason(self) -> str | None:
        """Why the run must stop now, or None."""
        if self._reason is None and time.monotonic() > self.deadline:
            self._reason = "timeout"
        return self._reason

    def on_metrics(self, scope: str, epoch: int, step: int, values: dict[str, float]) -> None:
        """Store a metrics report under the lease; a non-finite loss means training diverged."""
        for name in ("train_loss", "val_loss"):
            if name in values and not math.isfinite(values[name]):
                raise UserError(
                    f"training diverged: {name} is {values[name]} at epoch {epoch}, step {step}; "
                    "try a lower learning_rate, grad_clip, or normalize"
                )
        # Other metrics can be undefined (R² of a constant target): stored as null, not as NaN.
        clean = {k: float(v) if math.isfinite(v) else None for k, v in values.items()}
        with self._fenced(f"{scope} metrics at epoch {epoch}, step {step}") as session:
            attempts.record_metrics(
                session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                lease_seconds=self.settings.lease_seconds, scope=scope, epoch=epoch, step=step, values=clean,
            )

    def on_progress(self, epoch: int, step: int, fraction: float) -> None:
        """Store progress when it moved by at least half a percent (one small fenced write)."""
        if fraction < 1.0 and fraction - self._progress_written < 0.005:
            return
        with self._fenced(f"progress {fraction:.3f}") as session:
            job = attempts.renew(session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                                 lease_seconds=self.settings.lease_seconds)
            job.progress = max(0.0, min(1.0, fraction))
        self._progress_written = fraction

    def on_checkpoint(self, epoch: int, step: int, data: bytes, *, metric_name: str | None,
                      metric_value: float | None, is_best: bool, reason: str) -> None:
        """Write the file atomically, then its row (fenced); apply retention, file first."""
        root = self.settings.storage_root
        # A stop checkpoint can land on the position of the periodic one just written: each gets
        # its own file, so retention deleting one row's file never takes another row's with it.
        relative = (f"jobs/{self.job_id}/checkpoints/"
                    f"a{self.token}-e{epoch:05d}-s{step:09d}-{reason}-{secrets.token_hex(4)}.safetensors")
        # The file is written (and fsynced) before any transaction opens: no database lock is held
        # across disk I/O, which on SQLite would stall every other writer for as long as it takes.
        size, digest = storage.write_atomic(root, relative, data)
        try:
            with self._fenced(f"checkpoint at epoch {epoch}, step {step}") as session:
                row = attempts.add_checkpoint(
                    session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                    lease_seconds=self.settings.lease_seconds, epoch=epoch, step=step, path=relative,
                    size=size, sha256=digest, metric_name=metric_name, metric_value=metric_value,
                    is_best=is_best, reason=reason,
                )
                self.last_checkpoint_id = row.id
                if is_best:
                    self.best_checkpoint_id = row.id
                expired = {old.id: old.path for old in
                           attempts.expired_checkpoints(session=session, job_id=self.job_id, keep_last=self.keep_last)}
        except StaleAttempt:
            storage.delete(root, relative)
            raise
        if expired:
            # Retention: files first, with no transaction open, then their rows in a fenced one.
            for path in expired.values():
                storage.delete(root, path)
            with self._fenced("checkpoint retention") as session:
                attempts.renew(session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                               lease_seconds=self.settings.lease_seconds)
                for old in attempts.expired_checkpoints(session=session, job_id=self.job_id, keep_last=self.keep_last):
                    if old.id in expired:
                        session.delete(old)
        log.info("event=checkpoint job_id=%s attempt=%s epoch=%s step=%s bytes=%s", self.job_id, self.token, epoch, step, size)

