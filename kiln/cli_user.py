"""The user commands of ``kiln`` (login, submit, jobs, status, logs, predict...): the JSON API from a shell.

Each reads the server URL and token from, in order, ``--url``/``--token``, ``KILN_URL``/``KILN_TOKEN``,
then the file ``kiln login`` wrote. Errors print as one line (plus field errors) and exit with
:data:`EXIT_CODES`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from kiln import config, output
from kiln.client import TERMINAL_STATES, KilnClient
from kiln.errors import (
    Conflict, Forbidden, InvalidSpec, KilnConnectionError, KilnError, NotFound, RateLimited, ServerError,
    Unauthorized, WaitTimeout,
)

# Exit codes, one per way a command can end (docs/cli.md lists them).
EXIT_JOB_FAILED = 1  # the job ended failed or cancelled (--wait, --watch)
EXIT_CODES: list[tuple[type[KilnError], int]] = [
    (KilnConnectionError, 3), (Unauthorized, 4), (Forbidden, 5), (NotFound, 6), (Conflict, 7),
    (InvalidSpec, 8), (RateLimited, 9), (ServerError, 10), (WaitTimeout, 11),
]
EXIT_BAD_REQUEST = 8  # 400, 413 and 415 are bad requests too, like a 422
EXIT_OTHER = 12


def exit_code(exc: KilnError) -> int:
    """The exit code of a command that ended with ``exc``."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_BAD_REQUEST if exc.status in (400, 413, 415) else EXIT_OTHER


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Turn a client error into one clear line on stderr, its field errors, and its exit code."""
    try:
        yield
    except KilnError as exc:
        click.echo(f"kiln: error: {exc}", err=True)
        for error in exc.errors:
            click.echo(f"  {error.get('field')}: {error.get('message')}", err=True)
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            click.echo(f"  retry after {exc.retry_after:g} s", err=True)
        sys.exit(exit_code(exc))


def _connect(url: str | None, token: str | None) -> KilnClient:
    stored: dict[str, str] = {}
    if not (url or os.environ.get("KILN_URL")) or not (token or os.environ.get("KILN_TOKEN")):
        try:
            stored = config.load()
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    url = url or os.environ.get("KILN_URL") or stored.get("url")
    token = token or os.environ.get("KILN_TOKEN") or stored.get("token")
    if not url:
        raise click.UsageError("no server: run `kiln login URL`, or give --url or KILN_URL")
    return KilnClient(url, token)


def api_command(f):
    """Give a command ``--url`` and ``--token`` and call it with a connected client, errors reported."""
    @functools.wraps(f)
    def wrapper(*args: Any, url: str | None, token: str | None, **kwargs: Any) -> Any:
        with _reported(), _connect(url, token) as client:
            return f(client, *args, **kwargs)

    wrapper = click.option("--token", default=None, help="API token (else KILN_TOKEN, else the login file).")(wrapper)
    return click.option("--url", default=None, help="Server URL (else KILN_URL, else the login file).")(wrapper)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
job_id_argument = click.argument("job_id", type=click.IntRange(1))
wait_timeout_option = click.option("--timeout", type=float, default=None,
                                   help="Stop waiting after this many seconds (exit 11).")


def _finish(job: dict[str, Any], as_json: bool) -> None:
    """Print a finished job and exit non-zero unless it succeeded."""
    if as_json:
        output.print_json(job)
    else:
        click.echo(output.job_line(job))
    if job["state"] != "succeeded":
        sys.exit(EXIT_JOB_FAILED)


@click.command("login")
@click.argument("url")
@click.option("--token", default=None, help="Else KILN_TOKEN, else a hidden prompt.")
def login(url: str, token: str | None) -> None:
    """Check a token against the server at URL, then store both (mode 0600) for later commands."""
    token = token or os.environ.get("KILN_TOKEN") or click.prompt("API token", hide_input=True)
    with _reported(), KilnClient(url, token.strip()) as client:
        client.check()
    path = config.save(client.url, token.strip())
    click.echo(f"logged in to {client.url}; saved to {path}")


@click.command("submit")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 1 if it failed or was cancelled.")
@wait_timeout_option
@json_option
@api_command
def submit(client: KilnClient, spec_file: Path, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Submit a job spec (JSON or YAML) and print its id; --wait waits for it to end."""
    job = client.submit(output.read_spec(spec_file))
    if not wait:
        output.print_json(job) if as_json else click.echo(job["id"])
        return
    if not as_json:
        click.echo(job["id"])
    _finish(client.wait(job["id"], timeout=timeout), as_json)


@click.command("jobs")
@click.option("--state", default=None, help="queued, running, paused, succeeded, failed or cancelled.")
@click.option("--kind", type=click.Choice(["train", "predict"]), default=None)
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@json_option
@api_command
def jobs(client: KilnClient, state: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """List your jobs, newest first."""
    page = client.list_jobs(state=state, kind=kind, limit=limit)
    if as_json:
        output.print_json(page)
        return
    output.table(("ID", "KIND", "NAME", "STATE", "PROGRESS", "EPOCH", "CREATED", "ERROR"), [
        (j["id"], j["kind"], j.get("name"), j["state"], f"{100 * (j.get('progress') or 0):.0f}%", j.get("epoch"),
         j.get("created_at"), (j.get("error") or {}).get("class"))
        for j in page["items"]
    ])


@click.command("status")
@job_id_argument
@click.option("--watch", is_flag=True, help="Redraw a progress bar until the job ends.")
@json_option
@api_command
def status(client: KilnClient, job_id: int, watch: bool, as_json: bool) -> None:
    """Show a job; --watch redraws a progress bar until it ends (exit 1 if it failed or was cancelled)."""
    if not watch:
        job = client.get_job(job_id)
        output.print_json(job) if as_json else output.show_job(job)
        return
    if as_json:
        for job in client.watch(job_id):
            click.echo(json.dumps(job))
    else:
        job = output.watch_progress(client.watch(job_id))
        click.echo(output.job_line(job))
    if job["state"] != "succeeded":
        sys.exit(EXIT_JOB_FAILED)


@click.command("logs")
@job_id_argument
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the job ends.")
@json_option
@api_command
def logs(client: KilnClient, job_id: int, follow: bool, as_json: bool) -> None:
    """Print a job's events as log lines; --follow keeps printing new ones until the job ends."""
    seen = 0
    delay = 0.5
    while True:
        # Read the state first: events written before a final state are then all in the next read.
        state = client.get_job(job_id)["state"] if follow else None
        for event in client.events(job_id):
            if event["id"] > seen:
                seen = event["id"]
                click.echo(json.dumps(event) if as_json else output.event_line(event))
                delay = 0.5
        if not follow or state in TERMINAL_STATES:
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def control(action: str) -> click.Command:
    """A command that sends ``action`` (cancel, retry, pause, resume) to a job."""
    def command(client: KilnClient, job_id: int, as_json: bool) -> None:
        job = getattr(client, action)(job_id)
        output.print_json(job) if as_json else click.echo(f"job {job['id']}: {job['state']}")

    command.__doc__ = {"cancel": "Cancel a job (a running one stops at its next step check).",
                       "retry": "Queue a failed or cancelled job again; it resumes from its checkpoint.",
                       "pause": "Pause a training job at its next checkpoint, freeing its worker.",
                       "resume": "Queue a paused job again."}[action]
    command.__name__ = action
    return click.command(action)(job_id_argument(json_option(api_command(command))))


@click.command("predict")
@click.argument("model")
@click.option("--input", "input_file", required=True, help="The rows: CSV, JSON or JSONL.",
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Wait for the job and print its predictions.")
@wait_timeout_option
@json_option
@api_command
def predict(client: KilnClient, model: str, input_file: Path, wait: bool, timeout: float | None,
            as_json: bool) -> None:
    """Predict with MODEL (name@latest, name@N or a job id) on the rows of a CSV or JSON file."""
    job = client.predict(model, output.read_rows(input_file))
    if not wait:
        output.print_json(job) if as_json else click.echo(job["id"])
        return
    job = client.wait(job["id"], timeout=timeout, interval=0.2)
    if job["state"] != "succeeded":
        _finish(job, as_json)
    output.print_json(job["result"]) if as_json else output.predictions_table(job["result"])


@click.command("list")
@json_option
@api_command
def datasets_list(client: KilnClient, as_json: bool) -> None:
    """List the built-in datasets and your uploads."""
    items = client.datasets()
    if as_json:
        output.print_json(items)
        return
    output.table(("ID", "NAME", "TASK", "ROWS", "FORMAT", "CREATED"), [
        (d["id"], d.get("name") or "", d.get("task") or "", d.get("rows"), d.get("format") or "builtin",
         d.get("created_at") or "")
        for d in items
    ])


@click.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="A name (default: the file's).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None)
@json_option
@api_command
def datasets_upload(client: KilnClient, file: Path, name: str | None, fmt: str | None, as_json: bool) -> None:
    """Upload a CSV, JSONL or Parquet file; prints the dataset id to name in a spec."""
    dataset = client.upload_dataset(file, name=name, format=fmt)
    if as_json:
        output.print_json(dataset)
        return
    columns = ", ".join(c.get("name", "?") for c in (dataset.get("schema") or {}).get("columns", []))
    click.echo(dataset["id"])
    click.echo(f"{dataset.get('name')}: {dataset.get('rows')} rows; columns: {columns}", err=True)


@click.command("list")
@click.option("--limit", type=click.IntRange(1, 200), default=None)
@json_option
@api_command
def models_list(client: KilnClient, as_json: bool, limit: int | None = None) -> None:
    """List your registered model versions, newest first."""
    items = client.models(limit=limit)
    if as_json:
        output.print_json(items)
        return
    output.table(("REF", "ID", "JOB", "ARCH", "TASK", "CREATED"), [
        (m["ref"], m["id"], m.get("job_id"), m.get("arch"), m.get("task"), m.get("created_at")) for m in items
    ])


def _limits(serving: dict[str, Any]) -> str:
    """``batch <= 8, wait <= 3 ms`` (a null limit is the global one)."""
    batch, delay = serving.get("max_batch_size"), serving.get("max_delay_ms")
    return (f"batch <= {batch if batch is not None else 'global'}, "
            f"wait <= {f'{delay} ms' if delay is not None else 'global'}")


def serving_options(f):
    """``--max-batch-size`` and ``--max-delay-ms``: a model's micro-batch limits (docs/api.md)."""
    f = click.option("--max-delay-ms", type=click.IntRange(0, 1000), default=None,
                     help="Longest wait for more requests to batch with, in ms (default: the global setting).")(f)
    return click.option("--max-batch-size", type=click.IntRange(1, 1024), default=None,
                        help="Most requests run as one forward pass (default: the global setting).")(f)


@click.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=click.IntRange(1))
@click.option("--warm/--no-warm", default=None,
              help="Load the version this alias names when a prediction worker starts.")
@serving_options
@json_option
@api_command
def models_alias(client: KilnClient, name: str, alias: str, version: int, warm: bool | None,
                 max_batch_size: int | None, max_delay_ms: int | None, as_json: bool) -> None:
    """Point NAME@ALIAS (production, staging, ...) at VERSION, creating or moving the alias.

    With --warm/--no-warm, --max-batch-size or --max-delay-ms the alias's serving settings are
    replaced by the ones given (a limit left out falls back to the version's, then the global one);
    without any of them a moved alias keeps its settings.
    """
    serving = None
    if warm is not None or max_batch_size is not None or max_delay_ms is not None:
        serving = {"warm": bool(warm), "max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms}
    model = client.set_alias(name, alias, version, serving=serving)
    if as_json:
        output.print_json(model)
        return
    click.echo(f"{name}@{alias} -> {name}@{model['aliases'][alias]}")
    settings = (model.get("alias_serving") or {}).get(alias)
    if settings is not None:
        click.echo(f"serving: {'warm, ' if settings.get('warm') else ''}{_limits(settings)}", err=True)


@click.command("unalias")
@click.argument("name")
@click.argument("alias")
@api_command
def models_unalias(client: KilnClient, name: str, alias: str) -> None:
    """Remove NAME@ALIAS (the versions stay; ``latest`` is automatic and cannot be removed)."""
    client.remove_alias(name, alias)
    click.echo(f"removed {name}@{alias}")


@click.command("serving")
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@serving_options
@json_option
@api_command
def models_serving(client: KilnClient, name: str, version: int, max_batch_size: int | None,
                   max_delay_ms: int | None, as_json: bool) -> None:
    """Set NAME@VERSION's micro-batch limits (a limit left out: the global setting)."""
    found = client.set_serving(name, version, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
    if as_json:
        output.print_json(found)
        return
    click.echo(f"{found.get('ref', f'{name}@{version}')}: {_limits(found.get('serving') or {})}")


@click.command("list")
@json_option
@api_command
def tokens_list(client: KilnClient, as_json: bool) -> None:
    """List your API tokens."""
    items = client.tokens()
    if as_json:
        output.print_json(items)
        return
    output.table(("ID", "NAME", "PREFIX", "STATUS", "CREATED", "LAST USED", "EXPIRES"), [
        (t.get("id"), t.get("name"), t.get("prefix"), t.get("status"), t.get("created_at"), t.get("last_used_at"),
         t.get("expires_at")) for t in items
    ])


@click.command("create")
@click.argument("name")
@click.option("--expires-at", default=None, help="When it stops working (an ISO date or time); default never.")
@json_option
@api_command
def tokens_create(client: KilnClient, name: str, expires_at: str | None, as_json: bool) -> None:
    """Create an API token; its secret is the last line printed (shown once)."""
    token = client.create_token(name, expires_at=expires_at)
    if as_json:
        output.print_json(token)
        return
    click.echo(f"new API token {name!r} (id {token.get('id')}), shown once:", err=True)
    click.echo(token.get("token"))


@click.command("revoke")
@click.argument("token_id", type=click.IntRange(1))
@api_command
def tokens_revoke(client: KilnClient, token_id: int) -> None:
    """Revoke one of your API tokens; it answers 401 from then on."""
    client.revoke_token(token_id)
    click.echo(f"revoked token {token_id}")


def _group_of(name: str, list_command: click.Command, doc: str) -> click.Group:
    """A group that lists when called alone (``kiln datasets``) and holds subcommands (``kiln datasets upload``)."""
    @click.pass_context
    def callback(ctx: click.Context, url: str | None, token: str | None, as_json: bool) -> None:
        if ctx.invoked_subcommand is None:
            ctx.invoke(list_command, url=url, token=token, as_json=as_json)

    callback.__doc__ = doc
    group = click.Group(name, callback=callback, invoke_without_command=True, help=doc, params=[
        click.Option(["--url"], default=None, help="Server URL (else KILN_URL, else the login file)."),
        click.Option(["--token"], default=None, help="API token (else KILN_TOKEN, else the login file)."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print machine-readable JSON."),
    ])
    group.add_command(list_command)
    return group


datasets = _group_of("datasets", datasets_list, "List datasets (built-in, then yours); `upload FILE` adds one.")
datasets.add_command(datasets_upload)
models = _group_of("models", models_list, "List your model versions; `alias NAME ALIAS VERSION` moves an alias, "
                   "`unalias` removes one, `serving NAME VERSION` sets micro-batch limits.")
models.add_command(models_alias)
models.add_command(models_unalias)
models.add_command(models_serving)
tokens = _group_of("tokens", tokens_list, "List your API tokens; `create NAME` and `revoke ID` manage them.")
tokens.add_command(tokens_create)
tokens.add_command(tokens_revoke)

COMMANDS = [login, submit, jobs, status, logs, *(control(a) for a in ("cancel", "retry", "pause", "resume")),
            predict, datasets, models, tokens]


def register(main: click.Group) -> None:
    """Add the user commands to the ``kiln`` group, next to the operator commands."""
    for command in COMMANDS:
        main.add_command(command)
