"""The Celery instance, configured from the one ``app.settings.CELERY`` mapping."""

from __future__ import annotations

import logging
import os
import weakref

from billiard.process import current_process
from celery import Celery, bootsteps
from celery.signals import setup_logging, worker_init, worker_process_init, worker_shutting_down

from app.settings import CELERY

# Pretrained models load from installed packages only; nothing in a worker may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)


class BrokerWatch(bootsteps.StartStopStep):
    """Say in the log when the worker's broker connection was lost and made again.

    Celery logs a connection loss it sees (Redis closed the socket) and restarts the consumer:
    :meth:`start` runs again. A connection that died silently (a half-open socket to a Redis
    that vanished) is dropped and re-made inside kombu and redis-py without any of that, so every
    Redis connection of the consumer also reports its own reconnects here.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.starts = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._watched: weakref.WeakSet = weakref.WeakSet()

    def start(self, c) -> None:
        """Log the (re)connection and watch the new connection's Redis pools."""
        self.starts += 1
        url = c.connection.as_uri() if c.connection is not None else "?"
        if self.starts == 1:
            log.info("event=broker_connected url=%s", url)
        else:
            log.warning("event=broker_reconnected url=%s how=consumer_restart", url)
        for channel in {id(ch): ch for ch in (getattr(c.connection, "default_channel", None),
                                              getattr(c.task_consumer, "channel", None)) if ch}.values():
            for name in ("pool", "async_pool"):
                pool = getattr(channel, name, None)  # redis transport only
                if pool is not None and hasattr(pool, "make_connection") and pool not in self._watched:
                    self._watch(pool)

    def _watch(self, pool) -> None:
        self._watched.add(pool)
        make = pool.make_connection

        def make_connection():
            connection = make()
            connection.register_connect_callback(self._on_connect)
            return connection

        pool.make_connection = make_connection
        for connection in list(getattr(pool, "_available_connections", [])) + list(getattr(pool, "_in_use_connections", [])):
            connection.register_connect_callback(self._on_connect)
            if getattr(connection, "_sock", None) is not None:
                self._seen.add(connection)

    def _on_connect(self, connection) -> None:
        # The first connect of a connection is routine; a second one means it had been dropped.
        if connection in self._seen:
            log.warning("event=broker_reconnected host=%s port=%s how=stale_connection_replaced",
                        getattr(connection, "host", "?"), getattr(connection, "port", "?"))
        self._seen.add(connection)


celery = Celery("kiln")
celery.config_from_object(CELERY)
celery.conf.include = ["worker.tasks"]
celery.steps["consumer"].add(BrokerWatch)


@setup_logging.connect
def _logging(**_kwargs) -> None:
    # Connected, so Celery leaves logging to Kiln: the same JSON lines as the web and reaper.
    from app.logs import configure
    from app.settings import SETTINGS

    configure(SETTINGS.log_level, SETTINGS.log_format)


@worker_init.connect
def _load_ml(**_kwargs) -> None:
    # The ML modules (torch, pandas, the architectures) take seconds to import: load them before the
    # worker consumes, not in its first job. Importing torch initialises no CUDA, so a prefork
    # pool may still fork after this.
    import worker.ml.prediction  # noqa: F401
    import worker.ml.training  # noqa: F401


@worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    # Pooled connections inherited from the parent must not be shared with it.
    from app.db import dispose_all

    dispose_all()
    threads = os.environ.get("KILN_TORCH_THREADS")
    if threads:
        from worker.ml import configure_threads

        configure_threads(int(threads))
    if _takes_predictions():
        from app.settings import SETTINGS
        from worker import model_cache

        # A prefork child reports to its parent within seconds, so it warms up in the background;
        # a solo worker (this is its main process) warms up before it takes its first job.
        model_cache.start(SETTINGS, in_background=current_process().name != "MainProcess")


def _takes_predictions() -> bool:
    """Whether this worker consumes the predict queue (``--queues``; every queue when none is chosen)."""
    from app.settings import PREDICT_QUEUE

    chosen = celery.amqp.queues.consume_from
    return not chosen or PREDICT_QUEUE in chosen


@worker_shutting_down.connect
def _on_shutdown(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    # Warm shutdown (SIGTERM): running jobs checkpoint and go back to the queue to resume elsewhere.
    from worker.runner import request_shutdown

    log.info("event=worker_shutting_down signal=%s how=%s", sig, how)
    request_shutdown()
