"""Logging for every Kiln process: JSON lines (or text) that carry the job id and attempt.

``bind_job`` puts the running job into a context variable; a filter copies it onto every record
logged inside, so a line from the training loop, the recorder or a library says which job it
belongs to without each call passing it along.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_job: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("kiln_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s job_id=%(job_id)s attempt=%(attempt)s %(message)s"


@contextmanager
def bind_job(job_id: int, attempt: int) -> Iterator[None]:
    """Within this block, log records carry ``job_id`` and ``attempt``."""
    token = _job.set((job_id, attempt))
    try:
        yield
    finally:
        _job.reset(token)


class JobContextFilter(logging.Filter):
    """Adds ``job_id`` and ``attempt`` (None outside a job) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _job.get()
        if not hasattr(record, "job_id"):
            record.job_id, record.attempt = bound if bound else (None, None)
        return True


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Send the root logger's records to stderr as JSON lines (``fmt="json"``) or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(job_id)s %(attempt)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
