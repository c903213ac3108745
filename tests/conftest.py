"""Shared fixtures: a real database (SQLite or PostgreSQL), a real Redis, real worker processes.

``KILN_TEST_DATABASE=postgresql`` runs the suite on PostgreSQL (a fresh database per run);
the default is a SQLite file. Redis is a private redis-server per run, or ``KILN_TEST_REDIS_URL``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from app import settings as settings_module
from app.db import session_factory
from app.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("KILN_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("KILN_TEST_REDIS_URL")
BACKEND = os.environ.get("KILN_TEST_DATABASE", "sqlite")
# Per-token rate limits have their own tests (tests/web/test_rate_limits.py, with tiny budgets);
# everywhere else a test's many requests with one token must not be throttled. Set before any
# settings are loaded, so the test apps and every subprocess (which copy os.environ) see it.
os.environ.setdefault("KILN_RATE_LIMIT_READ", "1000000/minute")
os.environ.setdefault("KILN_RATE_LIMIT_WRITE", "1000000/minute")


def create_pg_database(name: str) -> str:
    """Create an empty PostgreSQL database and return its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(name: str) -> None:
    """Drop a database made by :func:`create_pg_database` (closing stray connections)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> Iterator[str]:
    """A migrated database for this test run."""
    if BACKEND == "postgresql":
        name = f"kiln_test_{uuid.uuid4().hex[:10]}"
        url = create_pg_database(name)
        upgrade(url)
        yield url
        from app.db import _engines

        for engine in list(_engines.values()):
            engine.dispose()
        drop_pg_database(name)
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'kiln.db'}"
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis for this run: a private redis-server (so parallel runs never share a queue),
    or ``KILN_TEST_REDIS_URL`` when set (emptied first)."""
    if REDIS_URL:
        redis_lib.Redis.from_url(REDIS_URL).flushdb()
        yield REDIS_URL
        return
    from tests.integration.cluster import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.kill()


@pytest.fixture(scope="session")
def settings(database_url, redis_url, tmp_path_factory) -> settings_module.Settings:
    """Settings pointing at the test database, Redis and a temporary storage root."""
    return settings_module.SETTINGS.with_overrides(
        database_url=database_url, redis_url=redis_url, storage_root=tmp_path_factory.mktemp("storage"),
        lease_seconds=6.0, heartbeat_seconds=1.0, requeue_after_seconds=5.0, reaper_interval_seconds=1.0,
        webhook_retry_base_seconds=0.2, webhook_timeout_seconds=10.0,
    )


def settings_env(settings: settings_module.Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a subprocess."""
    env = dict(os.environ)
    env.update(
        KILN_DATABASE_URL=settings.database_url, KILN_REDIS_URL=settings.redis_url,
        KILN_STORAGE_ROOT=str(settings.storage_root), KILN_LEASE_SECONDS=str(settings.lease_seconds),
        KILN_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
        KILN_REQUEUE_AFTER_SECONDS=str(settings.requeue_after_seconds),
        KILN_REAPER_INTERVAL_SECONDS=str(settings.reaper_interval_seconds),
        KILN_VISIBILITY_TIMEOUT_SECONDS=str(settings.visibility_timeout_seconds),
        KILN_UNACKED_RESTORE_SECONDS=str(settings.unacked_restore_seconds),
        KILN_WEBHOOK_RETRY_BASE_SECONDS=str(settings.webhook_retry_base_seconds),
        KILN_WEBHOOK_TIMEOUT_SECONDS=str(settings.webhook_timeout_seconds),
        # Test receivers listen on 127.0.0.1, which production refuses (tests/test_webhooks.py
        # checks the refusal with this off).
        KILN_WEBHOOK_ALLOW_PRIVATE="1",
        KILN_TORCH_THREADS="1", PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def app(settings):
    """The Flask app configured for the test database and Redis."""
    from app import create_app

    return create_app({
        "TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
        "STORAGE_ROOT": settings.storage_root, "LEASE_SECONDS": settings.lease_seconds,
        "REQUEUE_AFTER_SECONDS": settings.requeue_after_seconds,
    })


@pytest.fixture
def client(app):
    """A Flask test client."""
    return app.test_client()


@pytest.fixture
def session(settings):
    """A session whose work is rolled back after the test."""
    s = session_factory(settings.database_url)()
    try:
        yield s
    finally:
        s.rollback()
        s.close()


@pytest.fixture
def make_user(settings):
    """Factory: create a committed user and return ``(user_id, token)``."""
    from app.accounts import create_user
    from app.db import session_scope

    def _make(admin: bool = False) -> tuple[int, str]:
        with session_scope(settings.database_url) as s:
            user, token = create_user(session=s, email=f"u{uuid.uuid4().hex[:12]}@example.com", is_admin=admin)
            return user.id, token

    return _make


@pytest.fixture
def auth(make_user) -> dict[str, str]:
    """Authorization headers of a fresh user."""
    _, token = make_user()
    return {"Authorization": f"Bearer {token}"}


class WebProcess:
    """A real ``kiln web`` (gunicorn) subprocess on a free port, with its log.

    :meth:`wait_ready` blocks until ``/healthz`` answers; :meth:`stop` ends it (SIGTERM, then SIGKILL).
    """

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int = 1, port: int | None = None):
        from app.embedded import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "web", "--port", str(self.port), "--workers", str(workers)],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> "WebProcess":
        """Block until ``/healthz`` answers (a loaded 2-core machine can take a while to start gunicorn)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=5)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"kiln web did not start:\n{self.log()}") from None
                time.sleep(0.3)

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class WorkerProcess:
    """A real ``kiln worker`` subprocess (a Celery worker) with its log."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str, name: str):
        self.log_path = log_path
        self.name = name
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--queues", queues, "--name", name],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until Celery logs that the worker is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"ready." in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker did not start:\n{self.log()}")

    def log(self) -> str:
        """The worker's output so far."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_worker(settings, tmp_path_factory):
    """Factory for worker subprocesses; every one is stopped at the end of the run."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("workers")

    def _start(queues: str = "train,predict,default", **env_overrides: str) -> WorkerProcess:
        env = settings_env(settings)
        env.update(env_overrides)
        name = f"test{len(started)}-{uuid.uuid4().hex[:6]}@localhost"
        w = WorkerProcess(env, logs / f"{name}.log", queues, name)
        started.append(w)
        w.wait_ready()
        return w

    yield _start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def worker(start_worker) -> WorkerProcess:
    """One shared worker for the end-to-end tests."""
    return start_worker()


def submit_unpublished(settings: settings_module.Settings, owner_id: int, spec: dict) -> int:
    """Record a queued job through the service, without publishing its wake-up message: no test
    worker left running on the session's queues will take it, so it stays queued."""
    from app.db import session_scope
    from app.jobs import service
    from app.jobs.schemas import parse_spec
    from app.models import User

    with session_scope(settings.database_url, write=True) as s:
        owner = s.get(User, owner_id)
        return service.submit(session=s, owner=owner, spec=parse_spec(spec), settings=settings).id


def run_inline(settings: settings_module.Settings, job_id: int, timeout: float = 180) -> str:
    """Run a job's first attempt in this process (no Celery); its final state.

    A job submitted through the API is also published on the session's Redis, where a worker that
    an earlier module started may take it first: then this waits for that worker to finish it.
    """
    from app.jobs.states import TERMINAL
    from app.models import Job
    from worker import runner

    outcome = runner.run(job_id, 0, worker="inline", settings=settings)
    if outcome != "dropped":
        return outcome
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_factory(settings.database_url)() as s:
            state = s.get(Job, job_id).state
        if state in TERMINAL:
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} taken by another worker never ended")


def wait_for_job(client, headers, job_id: int, states=("succeeded", "failed", "cancelled"), timeout: float = 180,
                 worker: WorkerProcess | None = None) -> dict:
    """Poll the API until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
        if body["state"] in states:
            return body
        time.sleep(0.25)
    raise AssertionError(
        f"job {job_id} stuck in {body.get('state')}: {body}\n" + (worker.log() if worker else "")
    )
