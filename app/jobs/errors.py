"""Errors the job services and the runner raise; each maps to a failure class or an HTTP answer."""

from __future__ import annotations

FAILURE_CLASSES = ("user_error", "oom", "timeout", "worker_lost", "internal")


class KilnError(Exception):
    """Base class of Kiln's domain errors."""


class SpecError(KilnError):
    """A job spec that cannot run; ``errors`` lists ``{"field", "message"}`` entries."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))

    @classmethod
    def at(cls, field: str, message: str) -> "SpecError":
        """One error at one field."""
        return cls([{"field": field, "message": message}])


class InvalidParameter(SpecError):
    """A query parameter that is malformed or out of range (answers 422 naming it)."""


class NotFound(KilnError):
    """The resource does not exist or belongs to someone else (both answer 404)."""


class Conflict(KilnError):
    """The request does not fit the resource's current state (answers 409)."""


class StaleAttempt(KilnError):
    """A write from an attempt that no longer holds the job's lease; it was refused."""


class JobFailure(KilnError):
    """A run that ended in a classified failure; ``failure_class`` is one of FAILURE_CLASSES."""

    failure_class = "internal"
    retryable = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UserError(JobFailure):
    """Bad spec or data that only the worker could see: never retried."""

    failure_class = "user_error"
    retryable = False


class OutOfMemory(JobFailure):
    """The device ran out of memory; the message says what to shrink."""

    failure_class = "oom"
    retryable = False


class JobTimeout(JobFailure):
    """The attempt ran past its ``max_attempt_runtime_s``."""

    failure_class = "timeout"
    retryable = False


class StopRequested(KilnError):
    """The run stopped at a step check because of ``reason`` (cancel, pause or shutdown)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
