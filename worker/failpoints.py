"""Fault injection for tests and chaos runs, switched on only by environment variables.

``KILN_FAILPOINT_FAIL_JOBS_NAMED=<prefix>`` makes every attempt of a training job whose name starts
with ``<prefix>`` crash with an internal error, as a bug in a model would.
``KILN_FAILPOINT_CHUNK_SLEEP_S=<seconds>`` slows a batch-file prediction down after each chunk, so a
test can kill its worker mid-file. ``KILN_FAILPOINT_TOKEN_SLEEP_S=<seconds>`` slows text generation down
after each published piece, so a test can watch a generation while it runs. Unset, nothing happens.
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


def chunk_pause() -> None:
    """Sleep ``KILN_FAILPOINT_CHUNK_SLEEP_S`` seconds after each committed batch-file chunk (kill tests)."""
    seconds = os.environ.get("KILN_FAILPOINT_CHUNK_SLEEP_S")
    if seconds:
        import time

        time.sleep(float(seconds))


def token_pause() -> None:
    """Sleep ``KILN_FAILPOINT_TOKEN_SLEEP_S`` seconds after each published piece of generated text."""
    seconds = os.environ.get("KILN_FAILPOINT_TOKEN_SLEEP_S")
    if seconds:
        import time

        time.sleep(float(seconds))
