"""Fault injection for tests and chaos runs, switched on only by environment variables.

``KILN_FAILPOINT_FAIL_JOBS_NAMED=<prefix>`` makes every attempt of a training job whose name starts
with ``<prefix>`` crash with an internal error, as a bug in a model would. Unset, nothing happens.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """An error raised on purpose by a failpoint."""


def check_job(name: str) -> None:
    """Raise :class:`InjectedFault` if a failpoint targets a job named ``name``."""
    prefix = os.environ.get("KILN_FAILPOINT_FAIL_JOBS_NAMED")
    if prefix and name.startswith(prefix):
        raise InjectedFault(f"failpoint: job {name!r} crashes on purpose")
