"""Settings from ``KILN_*`` environment variables with embedded defaults, and the Celery mapping.

Both front doors read this module: the web (``app.web``) and the worker (``worker``). It imports
neither Flask nor Celery, so a settings change is one place for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

TRAIN_QUEUE = "train"
PREDICT_QUEUE = "predict"
DEFAULT_QUEUE = "default"


def _default_var_dir() -> Path:
    return Path(os.environ.get("KILN_VAR_DIR", "var")).resolve()


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration; build with :func:`load` rather than by hand."""

    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_root: Path = field(default_factory=lambda: _default_var_dir() / "storage")
    secret_key: str = "dev-insecure-change-me"
    # Leases: a running attempt renews its lease every ``heartbeat_seconds``; the reaper takes
    # back a job whose lease has been expired for longer than ``lease_seconds``.
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    # The reconciler republishes a queued job nobody claimed after this long.
    requeue_after_seconds: float = 60.0
    reaper_interval_seconds: float = 5.0
    max_attempts: int = 3
    # Redis broker visibility timeout: the database lease, not this, decides who runs a job.
    visibility_timeout_seconds: int = 3600
    # How often a worker sweeps Redis for unacked messages past the visibility timeout.
    unacked_restore_seconds: int = 10
    max_upload_bytes: int = 200 * 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "json"

    def __post_init__(self) -> None:
        if not self.database_url:
            db_path = _default_var_dir() / "kiln.db"
            object.__setattr__(self, "database_url", f"sqlite:///{db_path}")
        object.__setattr__(self, "storage_root", Path(self.storage_root).resolve())

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Return a copy with the given fields replaced (used by tests and the CLI)."""
        return replace(self, **overrides)


_ENV_CASTS = {int: int, float: float, Path: Path, str: str}


def load(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from ``KILN_<FIELD>`` variables, falling back to embedded defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(f"KILN_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        cast = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "Path": Path}.get(f.type, str)
        values[f.name] = cast(raw)
    return Settings(**values)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one Celery mapping: JSON only, late acks, prefetch 1, train/predict/default queues."""
    import socket

    from app.queue import PREDICT_TASK, TRAIN_TASK  # task names only; no Celery import there

    return {
        "broker_url": settings.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 50,
        "worker_hijack_root_logger": False,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}, PREDICT_TASK: {"queue": PREDICT_QUEUE}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Sweep for expired unacked messages every 10 s (kombu's default is every 100 s).
            "unacked_restore_interval": settings.unacked_restore_seconds,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            # Every command a worker sends (ack, restore sweep, binding refresh) runs inside its
            # event loop: on a dead connection each waits this long before redis-py reconnects.
            "socket_timeout": 3,
            "retry_on_timeout": True,
            # A Redis that vanishes without closing its sockets (host lost, failover, NAT) leaves a
            # worker's BRPOP waiting forever on a half-open connection. With a health check every
            # 5 s, kombu drops a BRPOP whose reply is overdue by 1 + 5 s and a pub/sub connection that
            # misses its pings, and redis-py pings any connection idle that long before reusing it.
            "health_check_interval": 5,
            # Keepalive probes let the kernel notice a dead peer on its own (idle 10 s, then 3 x 5 s).
            "socket_keepalive": True,
            "socket_keepalive_options": {
                getattr(socket, name): value
                for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
                if hasattr(socket, name)
            },
        },
        "broker_heartbeat": 0,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


SETTINGS = load()
CELERY = celery_config(SETTINGS)
