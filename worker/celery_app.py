"""The Celery instance, configured from the one ``app.settings.CELERY`` mapping."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_shutting_down

from app.settings import CELERY

celery = Celery("kiln")
celery.config_from_object(CELERY)
celery.conf.include = ["worker.tasks"]

log = logging.getLogger(__name__)


@setup_logging.connect
def _logging(**_kwargs) -> None:
    # Connected, so Celery leaves logging to Kiln: the same JSON lines as the web and reaper.
    from app.logs import configure
    from app.settings import SETTINGS

    configure(SETTINGS.log_level, SETTINGS.log_format)


@worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    # Pooled connections inherited from the parent must not be shared with it.
    from app.db import dispose_all

    dispose_all()
    threads = os.environ.get("KILN_TORCH_THREADS")
    if threads:
        from worker.ml import configure_threads

        configure_threads(int(threads))


@worker_shutting_down.connect
def _on_shutdown(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    # Warm shutdown (SIGTERM): running jobs checkpoint and go back to the queue to resume elsewhere.
    from worker.runner import request_shutdown

    log.info("event=worker_shutting_down signal=%s how=%s", sig, how)
    request_shutdown()
