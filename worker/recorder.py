"""The recorder: a running attempt's fenced link to the database (metrics, checkpoints, lease).

It implements ``worker.ml.hooks.TrainingHooks``. Metric reports and progress are queued, not
written by the training thread: the process's heartbeat thread (``worker.heartbeat``) flushes
them in one fenced transaction that also renews the lease and reads the persisted cancel and
pause flags, so a stop request reaches the training loop within one heartbeat. A checkpoint, and
the attempt's final transaction, flush what is queued first, in their own transaction, so the
stored order is the order of the reports. A flush the database refuses (the attempt lost its
lease) makes :meth:`Recorder.stop_reason` answer "stale" and every later write raise StaleAttempt.

A periodic checkpoint is persisted (file, fsync, sha256, row, retention) by the process's
checkpoint thread while training goes on; the training thread only copies its tensors. Retention
deletes expired files after the checkpoint's transaction and their rows with the attempt's next
fenced transaction (the next checkpoint's or the final one): one transaction per checkpoint. At most one is in
flight per attempt: the next checkpoint, a stop checkpoint and the attempt's end wait for it, and
while it is in flight the heartbeat renews the lease without flushing reports, so none reported
after it is stored before its row.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Row, bindparam, delete
from sqlalchemy.orm import Session

from app import storage
from app.db import session_scope
from app.jobs import attempts
from app.jobs.errors import StaleAttempt, UserError
from app.models import Checkpoint, utcnow
from app.settings import Settings
from worker.heartbeat import SERVICE

log = logging.getLogger(__name__)

CHECKPOINT_THREAD = "kiln-checkpoint"
# The metric curves (``app.jobs.metric_curves``) are folded in a flush once this many reports, or
# reports this old, wait unfolded, and in the attempt's final transaction; a reader takes the
# reports after the curves from ``metrics``, so they are whole between folds too.
FOLD_REPORTS = 256
FOLD_SECONDS = 10.0


class CheckpointWriter:
    """The process's one checkpoint thread (started lazily, and again in a forked child)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def submit(self, persist: Callable[[], None]) -> Future:
        """Run ``persist`` on the checkpoint thread, in the caller's logging context."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # Not daemonic: an interpreter that exits waits for a checkpoint being written.
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=CHECKPOINT_THREAD)
                self._pid = os.getpid()
            return self._pool.submit(contextvars.copy_context().run, persist)


WRITER = CheckpointWriter()

_CHECKPOINTS = Checkpoint.__table__
_DELETE_ROWS = delete(_CHECKPOINTS).where(_CHECKPOINTS.c.job_id == bindparam("job"),
                                          _CHECKPOINTS.c.id.in_(bindparam("ids", expanding=True)))


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
        self.flushes = 0
        self._reason: str | None = None
        self._stale = False
        self._closed = False
        self._progress_written = 0.0
        # Reports waiting for the next flush; ``_queue_lock`` guards them (held for microseconds).
        self._pending: list[dict[str, Any]] = []
        self._pending_progress: float | None = None
        self._queue_lock = threading.Lock()
        # Held across a whole flush (take the queue, write it, commit), so two flushes never
        # commit out of order. Always taken before a transaction opens, never inside one.
        self._write_lock = threading.Lock()
        self._interval = max(0.2, min(settings.heartbeat_seconds, settings.lease_seconds / 3))
        self._renewed = time.monotonic()
        # Reports stored since the curves were last folded, and when the first of them was (monotonic).
        self._unfolded = 0
        self._unfolded_since = self._renewed
        self._context: contextvars.Context | None = None
        # The periodic checkpoint the checkpoint thread is persisting, if any (one at a time).
        self._in_flight: Future | None = None
        # Checkpoint rows whose files retention deleted, to delete in the next fenced transaction.
        # Only the thread persisting a checkpoint and the attempt's final transaction (which waits
        # for that one first) touch it.
        self._expired_rows: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Recorder":
        """Hand the attempt to the process's heartbeat thread, which logs in the caller's context."""
        self._context = contextvars.copy_context()
        SERVICE.register(self)
        return self

    def close(self) -> None:
        """Take the attempt off the heartbeat thread; whatever is still queued is dropped."""
        self._settle()
        SERVICE.unregister(self)
        with self._write_lock:  # a beat in flight finishes before the attempt is over
            self._closed = True

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to stop at its next step check (first reason wins)."""
        if self._reason is None:
            self._reason = reason

    @contextmanager
    def _fenced(self, what: str) -> Iterator[Session]:
        """One short transaction for one fenced write; a refused write leaves a durable trace."""
        try:
            with session_scope(self.settings.database_url, write=True) as session:
                yield session
        except StaleAttempt as exc:
            self._stale = True
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

    def _check_live(self) -> None:
        if self._stale:
            raise StaleAttempt(f"job {self.job_id}: attempt {self.token} no longer holds the lease")

    def _take(self) -> tuple[list[dict[str, Any]], float | None]:
        with self._queue_lock:
            batch, progress = self._pending, self._pending_progress
            self._pending, self._pending_progress = [], None
        return batch, progress

    def _put_back(self, batch: list[dict[str, Any]], progress: float | None) -> None:
        # A flush that failed for another reason than the fence (a database blip) is retried.
        with self._queue_lock:
            self._pending[:0] = batch
            if self._pending_progress is None:
                self._pending_progress = progress

    def _write_queued(self, session: Session, *, hold: bool = False, fold: bool = False) -> Row:
        """Write what is queued (and renew the lease) in ``session``; the caller holds ``_write_lock``.
        Returns the job's stop requests and webhook (``attempts.record_batch``).

        ``hold``: renew only, leaving the queue for the checkpoint in flight to store. The metric
        curves are folded with ``fold``, or once :data:`FOLD_REPORTS` reports, or reports
        :data:`FOLD_SECONDS` old, wait for it.
        """
        batch, progress = ([], None) if hold else self._take()
        now = time.monotonic()
        unfolded = self._unfolded + len(batch)
        waited = self._unfolded > 0 and now - self._unfolded_since >= FOLD_SECONDS
        fold = unfolded > 0 and (fold or unfolded >= FOLD_REPORTS or waited)
        try:
            lease = attempts.record_batch(session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                                          lease_seconds=self.settings.lease_seconds, metrics=batch,
                                          progress=progress, fold=fold)
        except StaleAttempt:
            raise  # refused: the batch is dropped with the attempt
        except BaseException:
            self._put_back(batch, progress)
            raise
        self._renewed = now
        if fold:
            self._unfolded = 0
        elif self._unfolded == 0 and batch:
            self._unfolded, self._unfolded_since = len(batch), now  # the oldest unfolded report's age counts
        else:
            self._unfolded = unfolded
        self.flushes += 1
        return lease

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint in flight is stored; raise (once) what stopped it.

        Called on the attempt's own thread only; the heartbeat keeps holding reports until it returns.
        """
        future = self._in_flight
        if future is not None:
            try:
                future.result()
            finally:
                self._in_flight = None

    def _settle(self) -> None:
        """Wait for the checkpoint in flight; its failure is logged (StaleAttempt also marks the attempt stale)."""
        try:
            self.wait_for_checkpoint()
        except StaleAttempt:
            pass
        except Exception as exc:  # noqa: BLE001 - the attempt is ending another way; the next one resumes
            log.warning("event=checkpoint_failed job_id=%s attempt=%s error=%r", self.job_id, self.token, exc)

    def _checkpoint_in_flight(self) -> bool:
        future = self._in_flight
        return future is not None and not future.done()

    @contextmanager
    def final(self, what: str) -> Iterator[Session]:
        """The attempt's last fenced transaction: queued reports and expired checkpoints' rows first,
        then the caller's writes.

        A checkpoint still in flight is waited for first; a caller that must not end the attempt
        on a checkpoint that failed calls :meth:`wait_for_checkpoint` before.
        """
        self._settle()
        self._check_live()
        with self._write_lock, self._fenced(what) as session:
            # With nothing queued or unfolded, the final transition's own compare-and-set on the token
            # is the fence. The curves' last fold comes after a renewal, which takes the job's row
            # first: a stale attempt's fold never waits on (or for) the live attempt's.
            if self._pending or self._pending_progress is not None or self._unfolded:
                self._write_queued(session, fold=True)
            deleted = self._delete_expired_rows(session)
            yield session
        self._expired_rows -= deleted

    @contextmanager
    def transaction(self, what: str) -> Iterator[Session]:
        """A fenced transaction of the running attempt: queued reports and a lease renewal first."""
        self._settle()
        self._check_live()
        with self._write_lock, self._fenced(what) as session:
            self._write_queued(session)  # renews the lease: the fence of the caller's writes too
            yield session

    # -- the heartbeat thread's side -----------------------------------------------------------

    def interval(self) -> float:
        """Seconds between lease renewals."""
        return self._interval

    def due(self, now: float) -> bool:
        """Whether the heartbeat thread should flush or renew now."""
        if self._stale or self._closed:
            return False
        return bool(self._pending) or self._pending_progress is not None or now - self._renewed >= self._interval

    def beat(self) -> None:
        """Flush queued reports and renew the lease in one fenced transaction; read cancel and pause."""
        if self._context is not None:
            self._context.run(self._beat)
        else:
            self._beat()

    def _beat(self) -> None:
        with self._write_lock:
            if self._closed or self._stale:
                return
            try:
                with self._fenced("lease renewal and queued metrics") as session:
                    lease = self._write_queued(session, hold=self._checkpoint_in_flight())
                    cancel, pause = lease.cancel_requested_at, lease.pause_requested_at
            except StaleAttempt:
                log.warning("event=lease_lost job_id=%s attempt=%s", self.job_id, self.token)
                return
            except Exception as exc:  # noqa: BLE001 - a database blip must not stop the heartbeat
                log.warning("event=heartbeat_failed job_id=%s attempt=%s error=%r", self.job_id, self.token, exc)
                return
        if cancel is not None:
            self.request_stop("cancel")
        elif pause is not None:
            self.request_stop("pause")

    # -- TrainingHooks -----------------------------------------------------------------------

    def stop_reason(self) -> str | None:
        """Why the run must stop now, or None; "stale" once the database refused a write.

        A periodic checkpoint that failed to persist (a full disk) raises its error here, at the
        next step, and the attempt fails as the synchronous write would have made it.
        """
        if self._stale:
            return "stale"
        future = self._in_flight
        if future is not None and future.done() and future.exception() is not None:
            self.wait_for_checkpoint()
        if self._reason is None and time.monotonic() > self.deadline:
            self._reason = "timeout"
        return self._reason

    def on_metrics(self, scope: str, epoch: int, step: int, values: dict[str, float]) -> None:
        """Queue a metrics report for the next flush; a non-finite loss means training diverged."""
        for name in ("train_loss", "val_loss"):
            if name in values and not math.isfinite(values[name]):
                raise UserError(
                    f"training diverged: {name} is {values[name]} at epoch {epoch}, step {step}; "
                    "try a lower learning_rate, grad_clip, or normalize"
                )
        self._check_live()
        # Other metrics can be undefined (R² of a constant target): stored as null, not as NaN.
        clean = {k: float(v) if math.isfinite(v) else None for k, v in values.items()}
        report = {"scope": scope, "epoch": epoch, "step": step, "values": clean, "at": utcnow()}
        with self._queue_lock:
            self._pending.append(report)

    def on_progress(self, epoch: int, step: int, fraction: float) -> None:
        """Queue progress when it moved by at least half a percent (written with the next flush)."""
        if fraction < 1.0 and fraction - self._progress_written < 0.005:
            return
        self._check_live()
        with self._queue_lock:
            self._pending_progress = fraction
        self._progress_written = fraction

    def on_checkpoint(self, epoch: int, step: int, data: Iterable[bytes | memoryview], *, metric_name: str | None,
                      metric_value: float | None, is_best: bool, reason: str) -> None:
        """Persist a checkpoint: a periodic one on the checkpoint thread, a stop checkpoint before returning."""
        self.wait_for_checkpoint()
        self._check_live()
        persist = functools.partial(self._persist_checkpoint, epoch, step, data, metric_name=metric_name,
                                    metric_value=metric_value, is_best=is_best, reason=reason)
        if reason != "periodic":
            persist()  # the attempt ends next: its checkpoint must be stored first
        else:
            self._in_flight = WRITER.submit(persist)

    def _delete_expired_rows(self, session: Session) -> set[int]:
        """Delete, in ``session`` (a fenced transaction), the rows of checkpoints whose files retention
        deleted; returns their ids, for the caller to forget once the transaction committed."""
        expired = set(self._expired_rows)
        if expired:
            session.connection().execute(_DELETE_ROWS, {"job": self.job_id, "ids": sorted(expired)})
        return expired

    def _persist_checkpoint(self, epoch: int, step: int, data: Iterable[bytes | memoryview], *,
                            metric_name: str | None, metric_value: float | None, is_best: bool, reason: str) -> None:
        """Write the file atomically, then its row (fenced); apply retention, file first."""
        root = self.settings.storage_root
        # A stop checkpoint can land on the position of the periodic one just written: each gets
        # its own file, so retention deleting one row's file never takes another row's with it.
        relative = (f"jobs/{self.job_id}/checkpoints/"
                    f"a{self.token}-e{epoch:05d}-s{step:09d}-{reason}-{secrets.token_hex(4)}.safetensors")
        # The file is written (and fsynced) before any transaction opens: no database lock is held
        # across disk I/O, which on SQLite would stall every other writer for as long as it takes.
        self._check_live()
        size, digest = storage.write_atomic(root, relative, data)
        try:
            # Queued metrics go first, in the same transaction: the reports before a checkpoint
            # are stored before it, whatever happens to the process next.
            with self._write_lock, self._fenced(f"checkpoint at epoch {epoch}, step {step}") as session:
                lease = self._write_queued(session)  # renews the lease: the fence of this whole transaction
                deleted = self._delete_expired_rows(session)
                checkpoint_id = attempts.add_checkpoint(
                    session=session, job_id=self.job_id, token=self.token, owner=self.owner,
                    lease_seconds=self.settings.lease_seconds, epoch=epoch, step=step, path=relative,
                    size=size, sha256=digest, metric_name=metric_name, metric_value=metric_value,
                    is_best=is_best, reason=reason, lease=lease,
                )
                self.last_checkpoint_id = checkpoint_id
                if is_best:
                    self.best_checkpoint_id = checkpoint_id
                expired = {old.id: old.path for old in
                           attempts.expired_checkpoints(session=session, job_id=self.job_id, keep_last=self.keep_last)}
        except StaleAttempt:
            storage.delete(root, relative)
            raise
        self._expired_rows -= deleted
        # Retention: files first, with no transaction open; their rows go in the attempt's next
        # fenced transaction (the next checkpoint's, or its final one), not in one of their own.
        # An expired checkpoint is never the newest or the best, so no resume or model reads it
        # meanwhile (and a resume that did would skip a missing file and try the one before).
        for checkpoint_id, path in expired.items():
            storage.delete(root, path)
            self._expired_rows.add(checkpoint_id)
        log.info("event=checkpoint job_id=%s attempt=%s epoch=%s step=%s bytes=%s", self.job_id, self.token, epoch, step, size)

