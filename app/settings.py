"""Settings from ``KILN_*`` environment variables with embedded defaults, and the Celery mapping.

Both front doors read this module: the web (``app.web``) and the worker (``worker``). It imports
neither Flask nor Celery, so a settings change is one place for both. ``SETTINGS`` and ``CELERY``
are read from the environment on first use, so a command can report a bad value as an error
rather than fail while importing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

TRAIN_QUEUE = "train"
PREDICT_QUEUE = "predict"
DEFAULT_QUEUE = "default"

PREFIX = "KILN_"
DEFAULT_SECRET_KEY = "dev-insecure-change-me"

# The environment :func:`load` reads; ``None`` means ``os.environ``.
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("kiln_environ", default=None)


class ConfigurationError(ValueError):
    """Settings that cannot start Kiln; the message names every offending variable."""


class _Environment(EnvSettingsSource):
    """``KILN_<FIELD>`` variables, from the mapping given to :func:`load`."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = _environ.get()
        return parse_env_vars(os.environ if env is None else env, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


class _SecretFiles(PydanticBaseSettingsSource):
    """``KILN_<FIELD>_FILE=/path``: the value is the file's content (Docker and Kubernetes secrets)."""

    def get_field_value(self, field, field_name):  # noqa: D102 - required by the base class, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = _environ.get()
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            var = f"{PREFIX}{name.upper()}"
            path = env.get(f"{var}_FILE")
            if not path:
                continue
            if env.get(var):
                raise ConfigurationError(f"{var} and {var}_FILE are both set: set one")
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigurationError(f"{var}_FILE: cannot read {path}: {exc.strerror}") from None
            values[name] = text[:-1] if text.endswith("\n") else text
        return values


class Settings(BaseSettings):
    """Process-wide configuration; build with :func:`load` rather than by hand."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    # ``production`` refuses insecure defaults (see :func:`insecure_settings`); ``kiln up`` is development.
    env: Literal["development", "production"] = "development"
    allow_insecure: bool = False
    # Where the embedded defaults live: the SQLite file, storage, the admin token.
    var_dir: Path = Path("var")
    # Unset, these two live under var_dir (see _embedded_defaults).
    database_url: str = "sqlite:///var/kiln.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_root: Path = Path("var/storage")
    secret_key: str = Field(DEFAULT_SECRET_KEY, repr=False)
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
    # The device memory a training job's model may need (app/sizing.py's estimate), checked at
    # submit. Workers do not report their device memory yet, so this setting is the bound.
    max_model_bytes: int = 16 * 1024**3
    # A JSON request body's own limit (job specs, tokens, users), far below the upload limit.
    max_json_bytes: int = 1024 * 1024
    # API rate limits per token (a signed-in browser: per user), in Flask-Limiter's notation;
    # reads (GET/HEAD) and writes have separate budgets. Empty turns a budget off.
    rate_limit_read: str = "600/minute"
    rate_limit_write: str = "60/minute"
    # How long a web process may answer from its cache of bearer-token lookups (app/token_cache.py):
    # a token revoked, or a user disabled or demoted, by another process is refused here within
    # this many seconds (at once in the process that made the change). 0 looks every token up.
    token_cache_seconds: float = Field(0.0, ge=0, le=300)
    # Per-user quotas, 0 = unlimited: queued + running jobs, attempt run time per UTC day,
    # bytes of checkpoints + uploaded datasets.
    quota_active_jobs: int = Field(0, ge=0)
    quota_compute_seconds_per_day: int = Field(0, ge=0)
    quota_storage_bytes: int = Field(0, ge=0)
    # Inline predictions: how long a request waits for the result by default, and at most
    # (``?wait=`` is capped there); past it the answer is 202 and the job carries on.
    inline_wait_seconds: float = Field(5.0, ge=0, le=300)
    max_inline_wait_seconds: float = Field(30.0, ge=0, le=300)
    # A log follow (GET /jobs/<id>/logs?follow=true) ends after this long; the client reconnects
    # with Last-Event-ID (proxies and load balancers drop longer requests anyway).
    log_follow_max_seconds: float = Field(600.0, ge=1, le=86400)
    # Micro-batching: a prediction worker runs up to this many queued predictions of one model
    # version in one forward pass, waiting at most this long for more to arrive (1 turns it off).
    predict_max_batch_size: int = Field(32, ge=1, le=1024)
    predict_max_delay_ms: int = Field(5, ge=0, le=1000)
    # Each prediction worker process keeps at most this many loaded models, and at most this many
    # bytes of their parameters and buffers (least recently used go first; a bigger model is not kept).
    predict_cache_models: int = Field(8, ge=0, le=1024)
    predict_cache_bytes: int = Field(2 * 1024**3, ge=0, le=1024**4)
    # Batch-file predictions commit their output every this many rows.
    predict_chunk_rows: int = Field(1000, ge=1, le=100_000)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # /metrics: a bearer token it requires, and/or a port of its own (then never on the web port).
    metrics_token: str = Field("", repr=False)
    metrics_port: int | None = None
    # Webhooks: private, loopback and link-local destinations are refused unless this is set
    # (a receiver on the same host or network, as in tests); see docs/api.md "Webhooks".
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # Tries per event; retry n waits base * 3**(n-1): 30 s, 90 s, 4.5 min, 13.5 min, 40.5 min (~1 h in all).
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    webhook_retry_base_seconds: float = Field(30.0, gt=0)
    # At most one ``progress`` event per job this often.
    webhook_progress_interval_seconds: float = Field(30.0, gt=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then ``KILN_<FIELD>``, then ``KILN_<FIELD>_FILE``."""
        return init_settings, _Environment(settings_cls), _SecretFiles(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults(cls, data: Any) -> Any:
        # The SQLite file and storage live under var_dir unless set.
        if isinstance(data, dict):
            var_dir = Path(data.get("var_dir") or "var").resolve()
            data = dict(data, var_dir=var_dir)
            if not data.get("database_url"):
                data["database_url"] = f"sqlite:///{var_dir / 'kiln.db'}"
            if not data.get("storage_root"):
                data["storage_root"] = var_dir / "storage"
        return data

    @field_validator("storage_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).resolve()

    @field_validator("metrics_port")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value < 65536:
            raise ValueError("must be a TCP port (1-65535)")
        return value

    @model_validator(mode="after")
    def _refuse_insecure_production(self) -> "Settings":
        problems = insecure_settings(self)
        if problems and self.env == "production" and not self.allow_insecure:
            raise ValueError("production mode (KILN_ENV=production) refuses to start:\n"
                             + "\n".join(f"  - {p}" for p in problems)
                             + "\n  (fix them, or set KILN_ALLOW_INSECURE=1 to start anyway)")
        return self

    @property
    def production(self) -> bool:
        """Whether this is a production deployment (``KILN_ENV=production``)."""
        return self.env == "production"

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Return a copy with the given fields replaced (used by tests and the CLI)."""
        return type(self).model_validate({**self.model_dump(), **overrides})


def insecure_settings(settings: Settings) -> list[str]:
    """What production mode refuses: the default secret key, SQLite, a Redis URL without a password."""
    problems = []
    if not settings.secret_key or settings.secret_key == DEFAULT_SECRET_KEY:
        problems.append("KILN_SECRET_KEY is the built-in development key: set a long random secret")
    if settings.database_url.startswith("sqlite"):
        problems.append("KILN_DATABASE_URL is SQLite: use PostgreSQL (postgresql+psycopg://...)")
    url = urlsplit(settings.redis_url)
    if not url.password and not parse_qs(url.query).get("password"):
        problems.append("KILN_REDIS_URL has no password: use redis://:PASSWORD@host:6379/0")
    return problems


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``KILN_<FIELD>`` (or ``KILN_<FIELD>_FILE``) variables over embedded defaults.

    Raises :class:`ConfigurationError` naming each variable whose value is refused.
    """
    reset = _environ.set(environ)
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    finally:
        _environ.reset(reset)


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        if error["loc"]:
            var = PREFIX + str(error["loc"][0]).upper()
            lines.append(f"  {var}={error.get('input')!r}: {error['msg']}")
        else:
            cause = (error.get("ctx") or {}).get("error")
            lines.append(str(cause) if cause else error["msg"])
    if any(error["loc"] for error in exc.errors()):
        lines.insert(0, "invalid Kiln settings:")
    return "\n".join(lines)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one Celery mapping: JSON only, late acks, prefetch 1, train/predict/default queues."""
    import socket

    from app.queue import PREDICT_TASK, TRAIN_TASK, WEBHOOK_TASK  # task names only; no Celery import there

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
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}, PREDICT_TASK: {"queue": PREDICT_QUEUE},
                        WEBHOOK_TASK: {"queue": DEFAULT_QUEUE}},
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


def __getattr__(name: str) -> Any:
    # ``SETTINGS`` and ``CELERY`` are built on first use (PEP 562) and then kept.
    if name == "SETTINGS":
        value: Any = load()
    elif name == "CELERY":
        value = celery_config(globals().get("SETTINGS") or __getattr__("SETTINGS"))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
