"""Poll latency with many jobs and metric rows: Kiln's GETs next to the bare SQL they run, in one process.

    .venv/bin/python -m bench.polls [--backend sqlite|postgresql|both] [--jobs 100000] [--metrics 1000000]
                                    [--requests 200] [--quick]

For each database it builds a fresh one (a SQLite file, or a new PostgreSQL database on
127.0.0.1:5432 that it drops at the end), migrated to head and filled with bulk inserts: two users,
``--jobs`` jobs in mixed states and kinds, ``--metrics`` metric rows of which one running training
job (the dashboard's target) has 20,000 step and 200 epoch reports. It then polls through the Flask
app in-process (its test client, a bearer token), so the figure is the app's own cost, not HTTP's,
and after each request replays on the same engine, through the bare driver, the request's main
query alone and every statement the request ran. It prints p50/p95 per request and its goal, and
exits 1 if a goal is missed: every poll p95 <= 20 ms; a 304's p50 at most a third of its 200's.
``--quick`` runs small sizes to check the harness in well under a minute; its numbers mean little.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import event

from app import create_app
from app.db import get_engine
from bench import poll_data

SIZES = {"full": {"jobs": 100_000, "metrics": 1_000_000, "requests": 200},
         "quick": {"jobs": 10_000, "metrics": 100_000, "requests": 20}}
GOAL_P95_MS = 20.0
GOAL_304_SHARE = 1 / 3
WARMUP = 5
STARTED = time.monotonic()


@dataclass
class Probe:
    """One poll: its path, and how to recognise its main statement among those the request runs."""

    name: str
    path: str
    main: Callable[[str], bool]
    main_304: Callable[[str], bool]


@dataclass
class PollRow:
    """One line of the table: a request's times, its SQL's times, and the 200 a 304 is held against."""

    backend: str
    name: str
    status: int
    statements: int = 0
    kiln: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this thread's CPU time per request: the load-free share
    query: list[float] = field(default_factory=list)
    all_sql: list[float] = field(default_factory=list)
    of: PollRow | None = None

    def verdict(self) -> tuple[str, bool]:
        """The goal this row is held to, and whether it is met."""
        ok = p95(self.kiln) <= GOAL_P95_MS
        if self.of is None:
            return f"p95 <= {GOAL_P95_MS:g} ms", ok
        share = p50(self.kiln) / p50(self.of.kiln)
        return f"p95 <= {GOAL_P95_MS:g} ms, p50 {share:.2f} of 200 <= 0.33", ok and share <= GOAL_304_SHARE


def p50(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def probes(data: poll_data.PollData) -> list[Probe]:
    """The polls a dashboard makes, with predicates picking each one's main statement."""
    def listing(s: str) -> bool:
        return "FROM jobs" in s and "ORDER BY jobs.id DESC" in s

    def list_version(s: str) -> bool:
        return "FROM job_list_versions" in s

    job, base = data.target_job, "/api/v1"
    return [
        Probe("GET /jobs (first page)", f"{base}/jobs", listing, list_version),
        Probe("GET /jobs?cursor=<deep>", f"{base}/jobs?cursor={data.deep_cursor}", listing, list_version),
        Probe("GET /jobs/<id>", f"{base}/jobs/{job}", lambda s: "jobs.spec" in s,
              lambda s: "count(checkpoints.id)" in s),
        Probe("GET /jobs/<id>/metrics?scope=step&points=500", f"{base}/jobs/{job}/metrics?scope=step&points=500",
              lambda s: "FROM metric_curve_chunks" in s, lambda s: "max(metrics.id)" in s),
        Probe("GET /jobs/<id>/metrics?limit=1000", f"{base}/jobs/{job}/metrics?limit=1000",
              lambda s: s.startswith("SELECT metrics.id"), lambda s: "max(metrics.id)" in s),
    ]


class _Recorder:
    """Records the statements (with their parameters) an engine sends while armed."""

    def __init__(self, engine):
        self.statements: list[tuple[str, object]] | None = None
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn, _cursor, statement, parameters, _context, _executemany):
        if self.statements is not None:
            self.statements.append((statement, parameters))


def _replay(raw, statements: list[tuple[str, object]]) -> float:
    """Run ``statements`` through the driver, fetching every row; milliseconds."""
    t0 = time.perf_counter()
    cursor = raw.cursor()
    for statement, parameters in statements:
        cursor.execute(statement, parameters)
        cursor.fetchall()
    elapsed = (time.perf_counter() - t0) * 1000
    cursor.close()
    raw.rollback()  # never idle in a transaction between replays
    return elapsed


def measure(backend: str, jobs: int, metrics: int, requests: int, say=None) -> list[PollRow]:
    """Build and fill a database on ``backend``, then time every poll and its SQL ``requests`` times."""
    say = say or (lambda text: _say(backend, text))
    rows: list[PollRow] = []
    with poll_data.database(backend, jobs, metrics, say=say) as data, \
            tempfile.TemporaryDirectory(prefix="kiln-polls-storage-") as storage:
        # WARNING: the app configures logging; request and migration INFO lines would flood the output.
        # Requests are counted against the token's rate limit as always, with a budget the run cannot spend.
        app = create_app({"TESTING": True, "DATABASE_URL": data.url, "STORAGE_ROOT": storage, "LOG_LEVEL": "WARNING",
                          "RATE_LIMIT_READ": "100000000/minute"})
        client = app.test_client()
        auth = {"Authorization": f"Bearer {data.token}"}
        engine = get_engine(data.url)
        recorder = _Recorder(engine)
        raw = engine.raw_connection()
        try:
            for probe in probes(data):
                first = client.get(probe.path, headers=auth)
                if first.status_code != 200 or not first.get_etag()[0]:
                    raise RuntimeError(f"{probe.path}: {first.status_code} {first.get_data(as_text=True)[:300]}")
                conditional = dict(auth, **{"If-None-Match": f'"{first.get_etag()[0]}"'})
                full = PollRow(backend, probe.name, 200)
                unchanged = PollRow(backend, probe.name + " (304)", 304, of=full)
                for row, headers, main in ((full, auth, probe.main), (unchanged, conditional, probe.main_304)):
                    _time(client, probe.path, headers, row, main, recorder, raw, requests)
                    say(f"{row.name}: kiln p50 {p50(row.kiln):.1f} p95 {p95(row.kiln):.1f} ms, "
                        f"query p50 {p50(row.query):.1f}, all {row.statements} statements p50 {p50(row.all_sql):.1f}")
                rows += [full, unchanged]
        finally:
            raw.close()
            event.remove(engine, "before_cursor_execute", recorder._record)
    return rows


def _time(client, path, headers, row: PollRow, main, recorder: _Recorder, raw, requests: int) -> None:
    for _ in range(WARMUP):  # also records the token's use, so the timed polls write nothing
        client.get(path, headers=headers)
    recorder.statements = []
    response = client.get(path, headers=headers)
    statements, recorder.statements = recorder.statements, None
    if response.status_code != row.status:
        raise RuntimeError(f"{path}: expected {row.status}, got {response.status_code}")
    mains = [s for s in statements if main(s[0])]
    if len(mains) != 1:
        raise RuntimeError(f"{path}: {len(mains)} main statements among {[s[0][:80] for s in statements]}")
    row.statements = len(statements)
    # Each timed part starts with no garbage of the part before it (a poll's 20,000 rows would otherwise
    # be collected inside the next replay); the long-lived objects are frozen so that is cheap.
    gc.collect()
    gc.freeze()
    try:
        for _ in range(requests):
            gc.collect()
            t0, c0 = time.perf_counter(), time.thread_time()
            response = client.get(path, headers=headers)
            row.kiln.append((time.perf_counter() - t0) * 1000)
            row.cpu.append((time.thread_time() - c0) * 1000)
            if response.status_code != row.status:
                raise RuntimeError(f"{path}: expected {row.status}, got {response.status_code}")
            gc.collect()
            row.query.append(_replay(raw, mains))
            gc.collect()
            row.all_sql.append(_replay(raw, statements))
    finally:
        gc.unfreeze()


def _say(backend: str, text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s {backend} polls] {text}", flush=True)


def table_lines(rows: list[PollRow]) -> tuple[list[str], list[list[str]], bool]:
    """The header, one line per row, and whether every goal is met."""
    header = ["backend", "request", "Kiln p50", "Kiln p95", "Kiln CPU p50", "query alone p50/p95", "all SQL p50/p95",
              "goal", "result"]
    lines, all_ok = [], True
    for r in rows:
        goal, ok = r.verdict()
        all_ok &= ok
        lines.append([r.backend, r.name, f"{p50(r.kiln):.1f} ms", f"{p95(r.kiln):.1f} ms", f"{p50(r.cpu):.1f} ms",
                      f"{p50(r.query):.1f} / {p95(r.query):.1f} ms",
                      f"{p50(r.all_sql):.1f} / {p95(r.all_sql):.1f} ms ({r.statements})", goal,
                      "PASS" if ok else "FAIL"])
    return header, lines, all_ok


def figure_lines(rows: list[PollRow]) -> tuple[list[list[str]], bool]:
    """The rows in :mod:`bench.control_plane`'s table shape (p95 against the SQL's p95), and whether all pass."""
    lines, all_ok = [], True
    for r in rows:
        goal, ok = r.verdict()
        all_ok &= ok
        lines.append([r.backend, f"{r.name} p95", f"{p95(r.kiln):.1f} ms", f"{p95(r.all_sql):.1f} ms (SQL)",
                      f"{p95(r.kiln) - p95(r.all_sql):+.1f} ms", goal, "PASS" if ok else "FAIL"])
    return lines, all_ok


def print_table(rows: list[PollRow], requests: int) -> bool:
    """Print the poll table; True if every goal is met."""
    header, lines, all_ok = table_lines(rows)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    print(f"\npolls: {requests} requests each through the Flask test client; query alone = the request's main "
          "statement replayed through the driver; all SQL = every statement it ran (count in brackets); "
          "Kiln CPU = the request thread's CPU time (no database server time)")
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    return all_ok


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` gives small defaults that explicit sizes override."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--jobs", type=int)
    p.add_argument("--metrics", type=int)
    p.add_argument("--requests", type=int)
    p.add_argument("--quick", action="store_true", help="small sizes, to check the harness in seconds")
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    for name, default in size.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.jobs < 100 or args.requests < 1 or args.metrics < poll_data.TARGET_STEPS + poll_data.TARGET_EPOCHS:
        p.error(f"need --jobs >= 100, --requests >= 1 and --metrics >= "
                f"{poll_data.TARGET_STEPS + poll_data.TARGET_EPOCHS}")
    return args


def main(argv=None) -> int:
    """Measure every poll on each chosen database and print the table; 1 if a goal is missed."""
    args = parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    rows: list[PollRow] = []
    for backend in backends:
        rows += measure(backend, args.jobs, args.metrics, args.requests)
    return 0 if print_table(rows, args.requests) else 1


if __name__ == "__main__":
    sys.exit(main())
