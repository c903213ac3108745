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

    def _heartbeat(self) -> None:
        interval = max(0.2, min(self.settings.heartbeat_seconds, self.settings.lease_seconds / 3))
        while not self._done.wait(interval):
            try:
                with session_scope(self.settings.database_url) as session:
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
        with session_scope(self.settings.database_url) as session:
            attempts.record_metrics(
                session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                lease_seconds=self.settings.lease_seconds, scope=scope, epoch=epoch, step=step, values=clean,
            )

    def on_progress(self, epoch: int, step: int, fraction: float) -> None:
        """Store progress when it moved by at least half a percent (one small fenced write)."""
        if fraction < 1.0 and fraction - self._progress_written < 0.005:
            return
        with session_scope(self.settings.database_url) as session:
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
        size, digest = storage.write_atomic(root, relative, data)
        try:
            with session_scope(self.settings.database_url) as session:
                row = attempts.add_checkpoint(
                    session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                    lease_seconds=self.settings.lease_seconds, epoch=epoch, step=step, path=relative,
                    size=size, sha256=digest, metric_name=metric_name, metric_value=metric_value,
                    is_best=is_best, reason=reason,
                )
                self.last_checkpoint_id = row.id
                if is_best:
                    self.best_checkpoint_id = row.id
                for old in attempts.expired_checkpoints(session=session, job_id=self.job_id, keep_last=self.keep_last):
                    storage.delete(root, old.path)
                    session.delete(old)
        except StaleAttempt:
            storage.delete(root, relative)
            raise
        log.info("event=checkpoint job_id=%s attempt=%s epoch=%s step=%s bytes=%s", self.job_id, self.token, epoch, step, size)

