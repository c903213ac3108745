"""What the user CLI reads and prints: spec and row files, tables, event lines, a job's live progress bar."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click


def read_spec(path: Path) -> dict[str, Any]:
    """A job spec from a JSON or YAML file (by extension; ``-`` reads JSON from standard input)."""
    try:
        text = click.get_text_stream("stdin").read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{path} is not valid YAML: {exc}") from None
    else:
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"{path} must hold one JSON/YAML object (the job spec)")
    return spec


def _cell(value: str) -> float | int | str:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def read_rows(path: Path) -> list[Any]:
    """Prediction inputs: a CSV (numbers; a header row is skipped), a JSON list of rows (or
    ``{"inputs": [...]}``) or JSONL (one row a line). A one-column text row becomes its string."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
        if suffix == ".json":
            data = json.loads(text)
            rows = data.get("inputs") if isinstance(data, dict) else data
        elif suffix in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            table = [[_cell(c.strip()) for c in r] for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
            # A header is a first row of names above rows of numbers.
            if len(table) > 1 and all(isinstance(c, str) for c in table[0]) and \
                    all(not isinstance(c, str) for c in table[1]):
                table = table[1:]
            rows = [r[0] if len(r) == 1 and isinstance(r[0], str) else r for r in table]
    except (OSError, ValueError) as exc:  # a UnicodeDecodeError is a ValueError
        raise click.BadParameter(f"cannot read rows from {path}: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise click.BadParameter(f"{path} holds no rows")
    return rows


def print_json(data: Any) -> None:
    """Machine output: indented JSON on standard output."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain aligned text table (no colours, so it pipes and greps)."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers)] + cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def loss_of(job: dict[str, Any]) -> tuple[str, float] | None:
    """The job's latest loss (train loss first, then validation loss), with its name."""
    latest = job.get("latest_metrics") or {}
    names = [n for n in ("train_loss", "loss", "val_loss") if n in latest] or sorted(n for n in latest if "loss" in n)
    for name in names:
        if isinstance(latest[name], (int, float)):
            return name, float(latest[name])
    return None


def job_line(job: dict[str, Any]) -> str:
    """One line about a job: id, state, epoch, latest loss, error."""
    parts = [f"job {job['id']}", job["state"]]
    total = ((job.get("spec") or {}).get("hyperparameters") or {}).get("epochs")
    if job.get("kind") == "train" and job.get("epoch") is not None:
        parts.append(f"epoch {job['epoch']}/{total}" if total else f"epoch {job['epoch']}")
    if loss := loss_of(job):
        parts.append(f"{loss[0]} {loss[1]:.4g}")
    if error := job.get("error"):
        parts.append(f"{error.get('class')}: {error.get('message')}")
    return "  ".join(parts)


def show_job(job: dict[str, Any]) -> None:
    """A job's main fields, one per line."""
    fields = [("id", job["id"]), ("kind", job["kind"]), ("name", job.get("name")), ("state", job["state"]),
              ("progress", f"{100 * (job.get('progress') or 0):.0f}%"), ("epoch", job.get("epoch")),
              ("attempts", job.get("attempts")), ("created", job.get("created_at")),
              ("started", job.get("started_at")), ("finished", job.get("finished_at"))]
    if loss := loss_of(job):
        fields.append((loss[0], f"{loss[1]:.4g}"))
    if job.get("model"):
        fields.append(("model", job["model"].get("ref")))
    if job.get("error"):
        fields.append(("error", f"{job['error'].get('class')}: {job['error'].get('message')}"))
    for key, value in fields:
        if value is not None:
            click.echo(f"{key + ':':<10} {value}")


def event_line(event: dict[str, Any]) -> str:
    """One job event as a log line: time, kind, transition, attempt, message."""
    parts = [event.get("at") or "-", event.get("kind") or "event"]
    if event.get("from") or event.get("to"):
        parts.append(f"{event.get('from') or '-'} -> {event.get('to') or '-'}")
    if event.get("attempt"):
        parts.append(f"attempt={event['attempt']}")
    if event.get("message"):
        parts.append(str(event["message"]))
    return "  ".join(parts)


def watch_progress(jobs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Draw a live progress bar (state, epoch, latest loss) for each new version of a job; answer the last."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    console = Console(stderr=False, highlight=False)
    last: dict[str, Any] = {}
    with Progress(TextColumn("job {task.fields[id]} [bold]{task.fields[state]}[/]"), BarColumn(),
                  TaskProgressColumn(), TextColumn("{task.fields[info]}"), console=console) as progress:
        task = None
        for job in jobs:
            line = job_line(job).split("  ", 2)
            fields = {"id": job["id"], "state": job["state"], "info": line[2] if len(line) > 2 else ""}
            done = 1.0 if job["state"] == "succeeded" else float(job.get("progress") or 0)
            if task is None:
                task = progress.add_task("", total=1.0, completed=done, **fields)
            else:
                progress.update(task, completed=done, **fields)
            last = job
    return last


def predictions_table(result: dict[str, Any]) -> None:
    """A prediction job's result as a table: row, then class and confidence, value or values."""
    rows = []
    for i, p in enumerate(result.get("predictions") or []):
        if "class" in p:
            probs = p.get("probabilities") or []
            confidence = f"{max(probs):.3f}" if probs else ""
            rows.append((i, p["class"], confidence))
        elif "values" in p:
            rows.append((i, ", ".join(f"{v:.6g}" for v in p["values"]), ""))
        else:
            rows.append((i, p.get("value"), ""))
    headers = ("ROW", "CLASS", "CONFIDENCE") if rows and "class" in (result["predictions"][0]) else ("ROW", "VALUE", "")
    click.echo(f"model {result.get('model')}")
    table(headers, rows)
