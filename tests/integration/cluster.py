"""A whole Kiln on this machine for fault injection: its own database, Redis, workers and reaper."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis as redis_lib
from sqlalchemy import select

from app import settings as settings_module
from app.db import session_scope
from app.embedded import free_port, redis_binary
from app.migrate import upgrade
from app.models import Attempt, Checkpoint, Job
from tests.conftest import BACKEND, ROOT, WorkerProcess, create_pg_database, drop_pg_database, settings_env


class RedisServer:
    """A private redis-server without persistence that a test may kill and start again."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port, empty."""
        self.proc = subprocess.Popen(
            [redis_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis_lib.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis_lib.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: everything in it is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class VanishingRedis:
    """A TCP relay in front of a :class:`RedisServer` whose :meth:`vanish` acts like the Redis host
    disappearing from the network: connections open at that moment stay open but fall silent
    forever (what a client sees when a host dies without closing its sockets), while connections
    made after :meth:`return_` reach the (restarted) server."""

    def __init__(self, server: RedisServer):
        self.server = server
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._generation = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._silent: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def vanish(self) -> None:
        """Kill the server; every open connection becomes a half-open one that never answers."""
        self._generation += 1
        self.server.kill()

    def return_(self) -> None:
        """Start the server again, empty; new connections reach it."""
        self.server.start()
        self._generation += 1

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, self._generation), daemon=True).start()

    def _serve(self, client: socket.socket, generation: int) -> None:
        upstream = None
        if generation % 2 == 0:  # the host is there
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
            except OSError:
                upstream = None
        if upstream is None:
            self._swallow(client)
            return
        threading.Thread(target=self._pump, args=(upstream, client, generation), daemon=True).start()
        self._pump(client, upstream, generation)

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        src.settimeout(0.2)
        from_client = src.getpeername()[1] != self.server.port
        while generation == self._generation:
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if generation != self._generation:
                break
            if not data:  # an ordinary close by either side: pass it on
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            try:
                dst.sendall(data)
            except OSError:
                break
        # The host vanished under this connection: the client's writes still "succeed" (read and
        # dropped) and nothing ever comes back; the upstream side is gone with the server.
        if from_client:
            self._swallow(src)

    def _swallow(self, client: socket.socket) -> None:
        self._silent.append(client)
        client.settimeout(None)
        while True:
            try:
                if not client.recv(65536):
                    return
            except OSError:
                return

    def close(self) -> None:
        """Stop accepting connections."""
        self._listener.close()
        for s in self._silent:
            try:
                s.close()
            except OSError:
                pass


class Cluster:
    """Database, Redis, worker subprocesses and a reaper subprocess, with helpers to inspect jobs."""

    def __init__(self, tmp: Path, *, vanishing_redis: bool = False, **overrides):
        self.tmp = tmp
        self._pg_name = None
        if BACKEND == "postgresql":
            self._pg_name = f"kiln_cluster_{uuid.uuid4().hex[:8]}"
            database_url = create_pg_database(self._pg_name)
        else:
            database_url = f"sqlite:///{tmp / 'cluster.db'}"
        upgrade(database_url)
        self.redis = RedisServer(tmp)
        self.redis.start()
        # Workers reach Redis through a relay that can make it vanish without closing a socket.
        self.vanishing = VanishingRedis(self.redis) if vanishing_redis else None
        values = dict(
            database_url=database_url, redis_url=self.vanishing.url if self.vanishing else self.redis.url, storage_root=tmp / "storage",
            lease_seconds=4.0, heartbeat_seconds=0.5, requeue_after_seconds=4.0, reaper_interval_seconds=0.5,
        )
        values.update(overrides)
        self.settings = settings_module.SETTINGS.with_overrides(**values)
        self.workers: list[WorkerProcess] = []
        self.reaper: subprocess.Popen | None = None
        from app import create_app

        self.app = create_app({"TESTING": True, **{k.upper(): v for k, v in values.items()}})
        self.client = self.app.test_client()
        from app.accounts import create_user

        with session_scope(database_url) as s:
            _, token = create_user(session=s, email=f"c{uuid.uuid4().hex[:8]}@example.com")
        self.auth = {"Authorization": f"Bearer {token}"}

    # -- processes ---------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess of this cluster."""
        env = settings_env(self.settings)
        env.update(extra)
        return env

    def start_worker(self, queues: str = "train,predict", **extra: str) -> WorkerProcess:
        """Start a ``kiln worker`` and wait until it is ready."""
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:4]}@{socket.gethostname()}"
        worker = WorkerProcess(self.env(**extra), self.tmp / f"{name}.log", queues, name)
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def start_reaper(self) -> None:
        """Start ``kiln reaper``."""
        log = open(self.tmp / "reaper.log", "wb")
        self.reaper = subprocess.Popen([sys.executable, "-m", "app.cli", "reaper"], env=self.env(), cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def close(self) -> None:
        """Stop everything and drop the database."""
        for w in self.workers:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
            w.stop(timeout=10)
        if self.reaper and self.reaper.poll() is None:
            self.reaper.kill()
            self.reaper.wait()
        self.redis.kill()
        if self.vanishing:
            self.vanishing.close()
        from app.db import _engines

        engine = _engines.pop(self.settings.database_url, None)
        if engine is not None:
            engine.dispose()
        if self._pg_name:
            drop_pg_database(self._pg_name)

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, spec: dict) -> int:
        """Submit through the API; returns the job id."""
        r = self.client.post("/api/v1/jobs", json=spec, headers=self.auth)
        assert r.status_code == 201, r.get_json()
        return r.get_json()["id"]

    def job(self, job_id: int) -> dict:
        """The job as the API shows it."""
        return self.client.get(f"/api/v1/jobs/{job_id}", headers=self.auth).get_json()

    def wait(self, job_id: int, states=("succeeded", "failed", "cancelled"), timeout: float = 120,
             until=None) -> dict:
        """Poll until the job is in ``states`` (and ``until(job)`` holds, if given)."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            body = self.job(job_id)
            if body["state"] in states and (until is None or until(body)):
                return body
            time.sleep(0.1)
        logs = "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in self.workers)
        raise AssertionError(f"job {job_id} never reached {states}: {body}\n{logs}")

    def db_job(self, job_id: int) -> Job:
        """The job's row, read from the database now (not through the API)."""
        with session_scope(self.settings.database_url) as s:
            job = s.get(Job, job_id)
            s.expunge(job)
            return job

    def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempt rows in order."""
        with session_scope(self.settings.database_url) as s:
            rows = s.execute(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).scalars().all()
            s.expunge_all()
            return list(rows)

    def rows(self, model, job_id: int) -> list:
        """Rows of ``model`` (Metric, Checkpoint, JobEvent) for a job, in insertion order."""
        with session_scope(self.settings.database_url) as s:
            rows = s.execute(select(model).where(model.job_id == job_id).order_by(model.id)).scalars().all()
            s.expunge_all()
            return list(rows)

    def worker_running(self, job_id: int) -> WorkerProcess:
        """The worker process holding the job's lease."""
        with session_scope(self.settings.database_url) as s:
            owner = s.get(Job, job_id).lease_owner or ""
        for w in self.workers:
            if owner.startswith(w.name):
                return w
        raise AssertionError(f"no worker of this cluster owns job {job_id} (owner {owner!r})")

    def final_weights(self, job_id: int) -> dict:
        """Model tensors of the job's newest checkpoint."""
        from safetensors.torch import load

        newest = max(self.rows(Checkpoint, job_id), key=lambda c: (c.step, c.id))
        data = (self.settings.storage_root / newest.path).read_bytes()
        return {k: v for k, v in load(data).items() if k.startswith("model.")}


def assert_no_overlap(attempts: list[Attempt]) -> None:
    """Attempts of one job never overlap in time."""
    for earlier, later in zip(attempts, attempts[1:]):
        assert earlier.ended_at is not None, f"attempt {earlier.number} never ended"
        assert earlier.ended_at <= later.started_at, (earlier.number, earlier.ended_at, later.started_at)

