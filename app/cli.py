"""The ``kiln`` command: run the web, workers and reaper, or everything at once with ``kiln up``."""

from __future__ import annotations

import os
import socket
import sys

import click

from app import settings as settings_module
from kiln.cli_user import register as register_user_commands


def _settings() -> settings_module.Settings:
    # Every command starts here, so a bad or (in production) insecure setting stops each one alike.
    try:
        return settings_module.load()
    except settings_module.ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="kiln")
def main() -> None:
    """Kiln: PyTorch training and prediction jobs as a service."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the web server binds.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Celery worker processes.")
def up(host: str, port: int, workers: int) -> None:
    """Run everything on this machine: embedded Redis, migrations, worker, reaper and web."""
    from app.embedded import run_all

    # Embedded mode is development mode (SQLite and a password-less loopback Redis are the point),
    # for this process, the migrations it runs and every child it starts.
    os.environ["KILN_ENV"] = "development"
    sys.exit(run_all(_settings(), host=host, port=port, workers=workers))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="gunicorn processes.")
def web(host: str, port: int, workers: int) -> None:
    """Serve the web app and API with gunicorn (and /metrics on KILN_METRICS_PORT when set)."""
    settings = _settings()
    binds = ["--bind", f"{host}:{port}"]
    if settings.metrics_port is not None:
        if settings.metrics_port == port:
            raise click.ClickException(f"KILN_METRICS_PORT={port} is the web port: choose another")
        # The same workers answer both ports; the app serves /metrics only on this one.
        binds += ["--bind", f"{host}:{settings.metrics_port}"]
    os.execvp(sys.executable, [
        sys.executable, "-m", "gunicorn", *binds, "--workers", str(workers), "--threads", "4",
        # Graceful stop within Docker's 10 s; no control socket: its default path is shared by every
        # gunicorn of the user, and Kiln has no use for it.
        "--access-logfile", "-", "--graceful-timeout", "10", "--no-control-socket", "app:create_app()",
    ])


@main.command()
@click.option("--queues", default="train,predict,default", show_default=True, help="Comma-separated queues.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Jobs at once (1 = one process per GPU, no fork).")
@click.option("--name", default=None, help="Worker node name (default kiln-<pid>@<host>).")
def worker(queues: str, concurrency: int, name: str | None) -> None:
    """Run a Celery worker for Kiln's queues."""
    settings = _settings()
    from worker.celery_app import celery

    node = name or f"kiln-{os.getpid()}@{socket.gethostname()}"
    # A single job per process runs in the main process (solo): SIGTERM then reaches the running
    # job, which checkpoints and goes back to the queue; nothing forks after torch starts.
    pool = "solo" if concurrency == 1 else "prefork"
    celery.worker_main([
        "worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", pool,
        "--hostname", node, "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ])


@main.command()
def reaper() -> None:
    """Run the reaper/reconciler loop (only one instance acts at a time)."""
    from app.reaper import run_forever

    from app.logs import configure

    settings = _settings()
    configure(settings.log_level, settings.log_format)
    run_forever(settings)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema."""
    from app.migrate import upgrade

    upgrade(_settings().database_url)
    click.echo("database is up to date")


@main.group()
def users() -> None:
    """Manage users."""


@users.command("create")
@click.argument("email")
@click.option("--admin", is_flag=True, help="Give the user access to everything (same as --role admin).")
@click.option("--role", type=click.Choice(["admin", "user", "viewer"]), default=None,
              help="admin: everything; user: own jobs (default); viewer: read-only.")
@click.option("--password-stdin", is_flag=True, help="Read a web sign-in password from standard input.")
@click.option("--password/--no-password", "ask_password", default=None,
              help="Prompt for a web sign-in password (default: prompt when interactive).")
def users_create(email: str, admin: bool, role: str | None, password_stdin: bool, ask_password: bool | None) -> None:
    """Create a user; the new API token is the last line of the output."""
    from app.accounts import create_user
    from app.db import session_scope
    from app.jobs.errors import Conflict

    if admin and role not in (None, "admin"):
        raise click.UsageError("--admin and --role disagree")
    role = role or ("admin" if admin else "user")
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif ask_password or (ask_password is None and sys.stdin.isatty()):
        password = click.prompt("Web sign-in password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope(_settings().database_url) as session:
            user, token = create_user(session=session, email=email, role=role, password=password)
            role = user.role
    except (Conflict, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    sign_in = "can sign in to the web" if password else "API tokens only (no web password)"
    click.echo(f"created {role} {email} ({sign_in}); API token (shown once):")
    click.echo(token)


@users.command("set-password")
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_set_password(email: str, password_stdin: bool) -> None:
    """Set (or replace) a user's web sign-in password."""
    from app.accounts import set_password
    from app.db import session_scope

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("New web sign-in password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope(_settings().database_url) as session:
            set_password(_find_user(session, email), password)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"password set for {email}")


@users.command("token")
@click.argument("email")
@click.option("--name", default="cli", show_default=True, help="A label for the token.")
def users_token(email: str, name: str) -> None:
    """Issue another API token for an existing user; the token is the last line of the output."""
    from app.accounts import issue_token
    from app.db import session_scope

    with session_scope(_settings().database_url) as session:
        user = _find_user(session, email)
        token = issue_token(session=session, user=user, name=name)
    click.echo(f"new API token for {email} (shown once):")
    click.echo(token)


@users.command("revoke-tokens")
@click.argument("email")
def users_revoke(email: str) -> None:
    """Revoke every API token of a user (they answer 401 from now on)."""
    from app.accounts import revoke_tokens
    from app.db import session_scope

    with session_scope(_settings().database_url) as session:
        count = revoke_tokens(session=session, user=_find_user(session, email))
    click.echo(f"revoked {count} token(s) of {email}")


def _find_user(session, email: str):
    from sqlalchemy import select

    from app.models import User

    user = session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()
    if user is None:
        raise click.ClickException(f"no user {email}")
    return user


# The user commands (login, submit, jobs, status...) talk to a server over the JSON API; they live in
# the client package, which imports neither Flask nor torch.
register_user_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
