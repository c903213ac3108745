"""The benchmark's private parts: a database, a Redis, and gunicorn or Celery processes on loopback ports.

Every process runs in its own session (process group) so :meth:`Stack.close` can stop it and all
its children; the PostgreSQL database, when one is made, is dropped there too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from app.db import make_engine
from app.embedded import free_port, start_redis
from app.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("KILN_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# The flags `kiln web` passes to gunicorn (app/cli.py); the bare baseline is served with the same.
GUNICORN_FLAGS = ["--workers", "2", "--threads", "4", "--access-logfile", "-", "--graceful-timeout", "10",
                  "--no-control-socket"]
# Kiln's API rate limits stay on in the bench, counted in Redis as always, with a budget no run spends.
RATE_BUDGET = "100000000/minute"


class Stack:
    """One database and one Redis, plus the processes started on them; a context manager that tears down.

    Without ``database_url`` it makes (and at the end drops) a fresh database of its own.
    """

    def __init__(self, tmp: Path, backend: str, database_url: str | None = None):
        self.tmp = tmp
        self.backend = backend
        self.procs: list[subprocess.Popen] = []
        self._pg_name: str | None = None
        self._redis: subprocess.Popen | None = None
        self.engine = None
        if database_url:  # a database someone else made (and drops): used as it is
            self.database_url = database_url
        elif backend == "postgresql":
            self._pg_name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
            self.database_url = _admin_sql(f'CREATE DATABASE "{self._pg_name}"', self._pg_name)
        else:
            self.database_url = f"sqlite:///{tmp / 'bench.db'}"

    def __enter__(self) -> "Stack":
        try:
            upgrade(self.database_url)
            self.engine = make_engine(self.database_url)
            self._redis, self.redis_url = start_redis(self.tmp / "redis")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """Environment for a child: Kiln's settings pointing at this stack, one torch thread, and
        rate limits no benchmark reaches (one token sends every request)."""
        return dict(
            os.environ, KILN_DATABASE_URL=self.database_url, KILN_REDIS_URL=self.redis_url,
            KILN_STORAGE_ROOT=str(self.tmp / "storage"), KILN_TORCH_THREADS="1", PYTHONUNBUFFERED="1",
            BENCH_REDIS_URL=self.redis_url,
            # The limiter still counts every request (its cost is Kiln's), with budgets wrk cannot spend.
            KILN_RATE_LIMIT_READ=RATE_BUDGET, KILN_RATE_LIMIT_WRITE=RATE_BUDGET,
        )

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv`` in its own process group, output to ``<tmp>/<name>.log``."""
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=self.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        proc.log_path = self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def serve(self, name: str, argv_for_port) -> int:
        """Start a web server from ``argv_for_port(port)`` on a free port; returns the port once it listens."""
        port = free_port()
        proc = self.spawn(name, argv_for_port(port))
        wait_for(lambda: _accepts(port), proc, 60, f"{name} to listen on {port}")
        return port

    def kiln_workers(self, queues: str, count: int) -> list[subprocess.Popen]:
        """Start ``count`` real ``kiln worker`` processes at once and wait until each is ready."""
        procs = [self.spawn(f"kiln-{queues}-{uuid.uuid4().hex[:6]}",
                            [sys.executable, "-m", "app.cli", "worker", "--queues", queues,
                             "--name", f"bench-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"])
                 for _ in range(count)]
        for p in procs:
            wait_for(lambda p=p: b"ready." in p.log_path.read_bytes(), p, 120, "a kiln worker to be ready")
        return procs

    def celery_workers(self, count: int) -> list[subprocess.Popen]:
        """Start ``count`` raw Celery workers of ``bench.noop_celery`` (solo pool, like ``kiln worker``)."""
        from bench.noop_celery import QUEUE

        procs = [self.spawn(f"noop-{uuid.uuid4().hex[:6]}",
                            [sys.executable, "-m", "celery", "-A", "bench.noop_celery", "worker", "--pool", "solo",
                             "--concurrency", "1", "--queues", QUEUE, "--loglevel", "INFO", "--without-gossip",
                             "--without-mingle", "--hostname", f"noop-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"])
                 for _ in range(count)]
        for p in procs:
            wait_for(lambda p=p: b"ready." in p.log_path.read_bytes(), p, 120, "a celery worker to be ready")
        return procs

    def stop(self, procs: list[subprocess.Popen], timeout: float = 20) -> None:
        """SIGTERM each process group, then SIGKILL what is left after ``timeout`` seconds."""
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(10)
            # Children that outlived their leader (a gunicorn worker) are in the same group.
            _signal_group(p, signal.SIGKILL)
            if p in self.procs:
                self.procs.remove(p)

    def close(self) -> None:
        """Stop every process, Redis and the engine; drop the PostgreSQL database if one was made."""
        try:
            self.stop(list(self.procs))
        finally:
            if self._redis is not None and self._redis.poll() is None:
                self._redis.kill()
                self._redis.wait(10)
            if self.engine is not None:
                self.engine.dispose()
            if self._pg_name:
                _admin_sql(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)', self._pg_name)


def wait_for(ready, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Poll ``ready()`` every 50 ms for at most ``timeout`` seconds; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = proc.log_path.read_text(errors="replace")[-3000:] if proc is not None else ""
    raise RuntimeError(f"timed out waiting for {what}\n{tail}")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _admin_sql(statement: str, name: str) -> str:
    """Run one statement on the PostgreSQL admin database; returns the URL of database ``name``."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
