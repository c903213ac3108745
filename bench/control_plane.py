"""The control plane at the speed of its parts: Kiln next to bare Flask, Redis and Celery, in one run.

    .venv/bin/python -m bench.control_plane [--rounds 3] [--backend sqlite|postgresql|both] [--quick]

For each database it starts a private Redis, Kiln's web (``kiln web``) and a bare Flask app under
gunicorn with the same flags, real ``kiln worker`` processes and raw Celery workers, all on
127.0.0.1, and measures three figures for Kiln and its baseline side by side, round after round.
It then measures the polls (``bench.polls``: GET latency with many jobs and metric rows, through
the app in-process, next to the bare SQL) on a database of their own, and adds their rows.
It prints the medians, each ratio against its goal, and exits 1 if a goal is missed. ``--quick``
runs tiny sizes (seconds per figure) to check that the harness works; its numbers mean little.
Everything it starts is stopped at the end, and a PostgreSQL database it made is dropped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import figures, polls
from bench.bare_web import JOBS
from bench.stack import GUNICORN_FLAGS, Stack

SIZES = {"full": {"wrk_seconds": 10, "latency_jobs": 30, "drain_jobs": 1000},
         "quick": {"wrk_seconds": 2, "latency_jobs": 5, "drain_jobs": 30}}
STARTED = time.monotonic()


@dataclass
class Figure:
    """One line of the table: per-round values of both sides and the goal their medians are held to."""

    backend: str
    name: str
    unit: str
    goal: float  # the least ratio Kiln/baseline, or with ``as_delta`` the most milliseconds over it
    as_delta: bool = False
    kiln: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    failed_requests: int = 0

    def verdict(self) -> tuple[str, str, bool]:
        """The ratio (or delta) of the medians, the goal, and whether it is met."""
        k, b = statistics.median(self.kiln), statistics.median(self.baseline)
        if self.as_delta:
            return f"{k - b:+.1f} ms", f"<= +{self.goal:g} ms", k - b <= self.goal
        return f"{k / b:.2f}", f">= {self.goal:g}", k / b >= self.goal and not self.failed_requests


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` without ``--rounds`` means one round."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 3, or 1 with --quick)")
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness in seconds")
    p.add_argument("--only", choices=["post", "latency", "drain", "polls"], action="append",
                   help="measure only these figures (repeatable; default: all)")
    args = p.parse_args(argv)
    args.only = set(args.only or ("post", "latency", "drain", "polls"))
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def measure(backend: str, rounds: int, size: dict, only=frozenset({"post", "latency", "drain"})) -> list[Figure]:
    """Start one stack on ``backend`` and measure every figure ``rounds`` times, Kiln and baseline in turn."""
    post = Figure(backend, f"POST /api/v1/jobs, wrk {figures.WRK_CONNECTIONS} conn", "req/s", goal=0.7)
    latency = Figure(backend, "submit -> running p50, 1 warm worker", "ms", goal=5.0, as_delta=True)
    drain = Figure(backend, f"drain {size['drain_jobs']} predict jobs, 2 workers", "jobs/s", goal=0.5)
    with tempfile.TemporaryDirectory(prefix=f"kiln-bench-{backend}-") as tmp, Stack(Path(tmp), backend) as stack:
        JOBS.metadata.create_all(stack.engine)
        token = figures.user_token(stack)
        python = sys.executable
        kiln_port = stack.serve("kiln-web", lambda port: [python, "-m", "app.cli", "web", "--port", str(port)])
        bare_port = stack.serve("bare-web", lambda port: [python, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                                                          *GUNICORN_FLAGS, "bench.bare_web:create_app()"])
        kiln, bare = figures.Api(kiln_port, token), figures.Api(bare_port)
        figures.train_model(stack, kiln)
        _say(backend, "web servers up, tiny model trained")
        bare.submit(figures.WRK_SPEC)  # both answer 201 before wrk starts
        for n in range(1, rounds + 1):
            if "post" in only:
                rate, failed = figures.wrk_rate(kiln_port, token, size["wrk_seconds"])
                bare_rate, bare_failed = figures.wrk_rate(bare_port, token, size["wrk_seconds"])
                post.kiln.append(rate)
                post.baseline.append(bare_rate)
                post.failed_requests += failed + bare_failed
                _say(backend, f"round {n}: {post.name}: kiln {rate:.1f}, bare {bare_rate:.1f} req/s, "
                              f"failed requests {failed} / {bare_failed}")

            if "latency" in only:
                kiln_ms = statistics.median(figures.kiln_submit_to_running(stack, kiln, size["latency_jobs"]))
                celery_ms = statistics.median(figures.celery_round_trip(stack, size["latency_jobs"]))
                latency.kiln.append(kiln_ms)
                latency.baseline.append(celery_ms)
                _say(backend, f"round {n}: {latency.name}: kiln {kiln_ms:.1f}, celery {celery_ms:.1f} ms")

            if "drain" in only:
                kiln_rate = figures.kiln_drain(stack, kiln, size["drain_jobs"])
                celery_rate = figures.celery_drain(stack, size["drain_jobs"])
                drain.kiln.append(kiln_rate)
                drain.baseline.append(celery_rate)
                _say(backend, f"round {n}: {drain.name}: kiln {kiln_rate:.1f}, celery {celery_rate:.1f} per s")
    return [f for f, key in ((post, "post"), (latency, "latency"), (drain, "drain")) if key in only]


def _say(backend: str, text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s {backend}] {text}", flush=True)


def print_table(rows: list[Figure], rounds: int, poll_rows: list[polls.PollRow] | None = None) -> bool:
    """Print the medians (and the polls' p95s) with their verdicts; True if every goal is met."""
    header = ["backend", "figure", "Kiln", "baseline", "ratio/delta", "goal", "result"]
    poll_lines, all_ok = polls.figure_lines(poll_rows or [])
    lines = []
    for f in rows:
        shown, goal, ok = f.verdict()
        all_ok &= ok
        note = f" ({f.failed_requests} failed requests)" if f.failed_requests else ""
        lines.append([f.backend, f.name, f"{statistics.median(f.kiln):.1f} {f.unit}",
                      f"{statistics.median(f.baseline):.1f} {f.unit}", shown, goal, ("PASS" if ok else "FAIL") + note])
    lines += poll_lines
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    print(f"\nmedians of {rounds} round(s); baselines: bare Flask INSERT+LPUSH, raw Celery no-op task; "
          "polls: p95 through the app in-process, baseline every statement the poll ran, replayed alone")
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    return all_ok


def main(argv=None) -> int:
    """Measure every figure on each chosen database and print the table; 1 if a goal is missed."""
    args = parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    poll_size = polls.SIZES["quick" if args.quick else "full"]
    rows: list[Figure] = []
    poll_rows: list[polls.PollRow] = []
    for backend in backends:
        rows += measure(backend, args.rounds, size, args.only)
        if "polls" in args.only:
            poll_rows += polls.measure(backend, poll_size["jobs"], poll_size["metrics"], poll_size["requests"],
                                       say=lambda text, b=backend: _say(b, f"polls: {text}"))
    if poll_rows:
        polls.print_table(poll_rows, poll_size["requests"])
    return 0 if print_table(rows, args.rounds, poll_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
