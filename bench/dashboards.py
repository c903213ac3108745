"""What open pages cost the server while nothing changes: 50 dashboards and 50 job pages polling `kiln web`.

    .venv/bin/python -m bench.dashboards [--backend sqlite|postgresql|both] [--quick]
                                         [--duration 60] [--admins 50] [--watchers 50]

For each database it fills a fresh one with :mod:`bench.poll_data` (100k jobs, 1M metric rows;
``--quick``: 10k and 100k), adds ``--admins`` admin accounts and up to ``--watchers`` users who each
own one of the jobs that has not ended (fewer such jobs than watchers: tabs share a user), starts
``kiln web`` (gunicorn, the flags `kiln web` passes) on a loopback port with a private Redis, and
signs in one cookie session per open page through ``/login`` with the form's CSRF token. Then, for
``--duration`` seconds, each session makes what its page's htmx makes, at the template's interval:

- dashboard (``admin/_overview.html``): ``GET /admin/overview`` with ``HX-Request: true`` every 5 s;
- job page (``jobs/_status.html``, ``static/job.js``): ``GET /jobs/<id>/status`` with ``HX-Request``
  every 2 s, and after each swap the loss chart's ``GET /api/v1/jobs/<id>/metrics?scope=epoch&latest=true``.

As a browser does, each page keeps the last answer of every URL with its ETag and revalidates it
with ``If-None-Match`` (a 304 hands htmx the kept copy). As ``static/polling.js`` does, a panel whose
``data-version`` is the one shown is not swapped in, so the chart is fetched only after a real swap.

It prints polls asked and answered per second, the share of 304s, p50/p95 latency per request, and the CPU
the gunicorn master and workers used over the window as a share of wall time x cores (the database
server's and this client's own CPU are printed apart). Every request goes to 127.0.0.1, has a 15 s
timeout, and the run stops after its duration whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from sqlalchemy import select, text, update
from werkzeug.security import generate_password_hash

from app.accounts import PASSWORD_METHOD, create_user
from app.db import session_scope
from app.models import Job
from app import usage
from bench import poll_data
from bench.stack import Stack

SIZES = {"full": {"jobs": 100_000, "metrics": 1_000_000, "duration": 60.0},
         "quick": {"jobs": 10_000, "metrics": 100_000, "duration": 10.0}}
DASHBOARD_EVERY = 5.0  # app/web/pages_admin.py POLL_SECONDS
JOB_PAGE_EVERY = 2.0  # jobs/_status.html hx-trigger="every 2s"
PASSWORD = "bench-dashboards-password"
REQUEST_TIMEOUT = 15.0
SIGN_IN_TIMEOUT = 120.0
SIGN_IN_CONCURRENCY = 8
STARTED = time.monotonic()


@dataclass
class Tally:
    """The answers to one kind of request in the timed window."""

    name: str
    latencies: list[float] = field(default_factory=list)  # ms
    asked: int = 0  # requests the pages made (answered or not)
    not_modified: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    resent: int = 0  # sent again once on a fresh connection after the server closed a kept-alive one

    def add(self, status: int | str, ms: float) -> None:
        """Count one answer (a status) or one failure (its name)."""
        if isinstance(status, int) and status in (200, 304):
            self.latencies.append(ms)
            self.not_modified += status == 304
        else:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (nan for none)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def add_people(data: poll_data.PollData, admins: int, watchers: int) -> list[tuple[str, int]]:
    """Admin accounts and job watchers sharing one password; each watcher owns a job that has not ended.

    Returns ``(email, job_id)`` per watcher. One hash for all: a bench need not pay scrypt 100 times.
    """
    hashed = generate_password_hash(PASSWORD, method=PASSWORD_METHOD)
    with session_scope(data.url, write=True) as session:
        open_jobs = session.execute(select(Job.id).where(Job.state.in_(("queued", "running", "paused")))
                                    .order_by(Job.id.desc()).limit(watchers)).scalars().all()
        if not open_jobs:
            raise RuntimeError("the generated data has no job that has not ended")
        for i in range(admins):
            user, _ = create_user(session=session, email=f"admin{i}@bench.example", role="admin")
            user.password_hash = hashed
        owners = []
        moved = usage.Tally()  # the job counts move with the jobs
        for i, job_id in enumerate(open_jobs):
            user, _ = create_user(session=session, email=f"watcher{i}@bench.example", role="user")
            user.password_hash = hashed
            session.flush()
            moved.add(session.get(Job, job_id).owner_id, jobs=-1).add(user.id, jobs=1)
            session.execute(update(Job).where(Job.id == job_id).values(owner_id=user.id))
            owners.append((user.email, job_id))
        moved.apply(session=session)
    return [owners[i % len(owners)] for i in range(watchers)]


async def sign_in(base: str, email: str, landing: str) -> tuple[httpx.AsyncClient, str]:
    """A cookie session signed in through the form (CSRF token and all), and the ``landing`` page it opened."""
    client = httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, follow_redirects=True,
                               headers={"User-Agent": "kiln-bench-dashboards"})
    # Signing in a hundred pages (a password hash each) on a loaded machine is slow: it gets more time
    # than a poll, and is not measured.
    form = await client.get("/login", timeout=SIGN_IN_TIMEOUT)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form.text)
    if form.status_code != 200 or csrf is None:
        raise RuntimeError(f"/login answered {form.status_code} without a CSRF token")
    done = await client.post("/login", data={"csrf_token": csrf.group(1), "email": email, "password": PASSWORD},
                             timeout=SIGN_IN_TIMEOUT)
    if done.url.path == "/login":
        raise RuntimeError(f"{email} could not sign in: {done.status_code}")
    page = await client.get(landing, timeout=SIGN_IN_TIMEOUT)
    if page.status_code != 200:
        raise RuntimeError(f"{landing} answered {page.status_code} for {email}")
    return client, page.text


async def _get(client: httpx.AsyncClient, path: str, headers: dict, tally: Tally | None) -> httpx.Response | None:
    if tally is not None:
        tally.asked += 1
    t0 = time.perf_counter()
    try:
        try:
            response = await client.get(path, headers=headers)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # gunicorn closes a keep-alive connection idle for 2 s, the job page's interval: a browser
            # resends an idempotent request that met a connection closing under it, and so does this.
            if tally is not None:
                tally.resent += 1
            t0 = time.perf_counter()
            response = await client.get(path, headers=headers)
    except httpx.HTTPError as exc:
        if tally is not None:
            tally.add(type(exc).__name__, 0.0)
        return None
    if tally is not None:
        tally.add(response.status_code, (time.perf_counter() - t0) * 1000)
    return response


class Page:
    """One open page's browser cache (the last ETag of each URL) and the panel version it shows."""

    def __init__(self, client: httpx.AsyncClient, shown: str | None):
        self.client = client
        self.etags: dict[str, str] = {}
        self.shown = shown  # the polled panel's data-version, as the page was loaded

    async def revalidate(self, path: str, headers: dict, tally: Tally | None) -> httpx.Response | None:
        """GET ``path`` as a browser would: conditional on the ETag it kept from the last 200."""
        if path in self.etags:
            headers = {**headers, "If-None-Match": self.etags[path]}
        response = await _get(self.client, path, headers, tally)
        if response is not None and response.status_code == 200 and response.headers.get("ETag"):
            self.etags[path] = response.headers["ETag"]
        return response

    def swaps(self, response: httpx.Response | None) -> bool:
        """Whether htmx swaps this answer in: a 200 whose panel version differs from the one shown
        (a 304 is the kept copy of what is shown; ``static/polling.js`` skips an equal version)."""
        if response is None or response.status_code != 200:
            return False
        found = VERSION.search(response.text)
        version = found.group(1) if found else None
        if version is not None and version == self.shown:
            return False
        self.shown = version
        return True


VERSION = re.compile(r'data-version="([^"]*)"')


async def dashboard(page: Page, start: float, end: float, tally: Tally) -> None:
    """An open ``/admin``: its panel re-fetched every 5 s."""
    headers = {"HX-Request": "true", "HX-Current-URL": str(page.client.base_url.join("/admin")),
               "HX-Target": "overview", "HX-Trigger": "overview"}

    async def poll():
        page.swaps(await page.revalidate("/admin/overview", headers, tally))

    await _tick(start, end, DASHBOARD_EVERY, poll)


async def job_page(page: Page, job_id: int, start: float, end: float, status: Tally, chart: Tally) -> None:
    """An open ``/jobs/<id>``: the status panel every 2 s, and the chart's metrics after each swap."""
    headers = {"HX-Request": "true", "HX-Current-URL": str(page.client.base_url.join(f"/jobs/{job_id}")),
               "HX-Target": "job-status", "HX-Trigger": "job-status"}
    metrics = f"/api/v1/jobs/{job_id}/metrics?scope=epoch&latest=true"

    async def poll():
        if page.swaps(await page.revalidate(f"/jobs/{job_id}/status", headers, status)):
            await page.revalidate(metrics, {"Accept": "application/json"}, chart)

    await _tick(start, end, JOB_PAGE_EVERY, poll)


async def _tick(start: float, end: float, every: float, poll) -> None:
    # htmx's "every Ns" fires on a timer whether or not the last answer came: a fixed rate, not a gap.
    due = start
    while due < end:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if time.monotonic() >= end:
            return
        await poll()
        due += every


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for p in procs:
        try:
            t = p.cpu_times()
            seconds[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def _postgres_cpu() -> float:
    total = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return total


async def _run_clients(port: int, admins: int, watchers: list[tuple[str, int]], duration: float,
                       web: psutil.Process, say) -> dict:
    base = f"http://127.0.0.1:{port}"
    gate = asyncio.Semaphore(SIGN_IN_CONCURRENCY)

    async def open_page(email: str, landing: str) -> Page:
        async with gate:
            client, html = await sign_in(base, email, landing)
        found = VERSION.search(html)
        return Page(client, found.group(1) if found else None)

    t0 = time.monotonic()
    admin_pages = await asyncio.gather(*(open_page(f"admin{i}@bench.example", "/admin") for i in range(admins)))
    job_pages = await asyncio.gather(*(open_page(email, f"/jobs/{job}") for email, job in watchers))
    # The page load's own chart fetch, so the first poll's chart revalidates as a browser's would.
    for page, (_, job) in zip(job_pages, watchers):
        await page.revalidate(f"/api/v1/jobs/{job}/metrics?scope=epoch&latest=true", {"Accept": "application/json"}, None)
    tagged = sum(bool(p.etags) for p in job_pages)
    say(f"{admins + len(watchers)} pages open and signed in ({time.monotonic() - t0:.1f} s); "
        f"{tagged} chart responses carry an ETag; {sum(p.shown is not None for p in admin_pages + job_pages)} "
        f"pages show a panel version")
    tallies = {"overview": Tally("GET /admin/overview (HX)"), "status": Tally("GET /jobs/<id>/status (HX)"),
               "chart": Tally("GET /api/v1/jobs/<id>/metrics?scope=epoch&latest=true (If-None-Match)")}
    rng = random.Random(0)
    procs = [web] + web.children(recursive=True)
    me = psutil.Process()
    cpu0, pg0, me0 = _cpu(procs), _postgres_cpu(), sum(me.cpu_times()[:2])
    load_before = psutil.getloadavg()
    start = time.monotonic() + 0.5
    end = start + duration
    # Pages opened at random moments: each starts at a random phase of its interval.
    tasks = [dashboard(p, start + rng.uniform(0, DASHBOARD_EVERY), end, tallies["overview"]) for p in admin_pages]
    tasks += [job_page(p, job, start + rng.uniform(0, JOB_PAGE_EVERY), end, tallies["status"], tallies["chart"])
              for p, (_, job) in zip(job_pages, watchers)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + REQUEST_TIMEOUT * 2 + 5)
    finally:
        wall = time.monotonic() - start
        cpu1, pg1, me1 = _cpu(procs + web.children(recursive=True)), _postgres_cpu(), sum(me.cpu_times()[:2])
        await asyncio.gather(*(p.client.aclose() for p in admin_pages + job_pages))
    web_cpu = sum(cpu1.get(pid, 0.0) - cpu0.get(pid, 0.0) for pid in cpu1)
    return {"tallies": list(tallies.values()), "wall": wall, "web_cpu": web_cpu, "pg_cpu": pg1 - pg0,
            "load_before": load_before,
            "client_cpu": me1 - me0, "web_processes": len(cpu1)}


def measure(backend: str, jobs: int, metrics: int, duration: float, admins: int, watchers: int) -> dict:
    """Fill a database on ``backend``, serve it with ``kiln web`` and poll it from open pages for ``duration`` s."""
    def say(line: str) -> None:
        print(f"[{time.monotonic() - STARTED:6.1f}s {backend} dashboards] {line}", flush=True)

    with poll_data.database(backend, jobs, metrics, say=say) as data, \
            tempfile.TemporaryDirectory(prefix="kiln-dashboards-") as tmp, \
            Stack(Path(tmp), backend, database_url=data.url) as stack:
        people = add_people(data, admins, watchers)
        say(f"{admins} admins, {len(people)} job pages on {len(set(people))} jobs")
        port = stack.serve("kiln-web", lambda p: [sys.executable, "-m", "app.cli", "web", "--host", "127.0.0.1",
                                                  "--port", str(p)])
        web = psutil.Process(stack.procs[-1].pid)
        result = asyncio.run(_run_clients(port, admins, people, duration, web, say))
        with stack.engine.connect() as conn:  # the data is still what it was: nothing changed while polling
            result["jobs"] = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    result.update(backend=backend, cores=psutil.cpu_count(), load=psutil.getloadavg())
    return result


def print_report(results: list[dict], duration: float) -> None:
    """One table of requests per backend, then the CPU lines."""
    header = ["backend", "request", "asked/s", "answered/s", "304 share", "p50", "p95", "resent", "failed"]
    lines = []
    for r in results:
        total = sum(len(t.latencies) for t in r["tallies"])
        for t in r["tallies"] + [None]:
            if t is None:
                lat = [x for tt in r["tallies"] for x in tt.latencies]
                t = Tally("all polls", lat, asked=sum(tt.asked for tt in r["tallies"]),
                          not_modified=sum(tt.not_modified for tt in r["tallies"]),
                          errors={k: v for tt in r["tallies"] for k, v in tt.errors.items()},
                          resent=sum(tt.resent for tt in r["tallies"]))
            n = len(t.latencies)
            lines.append([r["backend"], t.name, f"{t.asked / r['wall']:.1f}", f"{n / r['wall']:.1f}",
                          f"{t.not_modified / n:.0%}" if n else "-",
                          f"{percentile(t.latencies, 0.5):.1f} ms", f"{percentile(t.latencies, 0.95):.1f} ms",
                          str(t.resent),
                          ", ".join(f"{k} x{v}" for k, v in t.errors.items()) or "0"])
        r["total"] = total
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    print(f"\nopen pages polling for {duration:g} s (nothing changes meanwhile)")
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    for r in results:
        cap = r["wall"] * r["cores"]
        print(f"{r['backend']}: kiln web ({r['web_processes']} gunicorn processes) used {r['web_cpu']:.1f} CPU-s "
              f"in {r['wall']:.1f} s = {r['web_cpu'] / cap:.1%} of {r['cores']} cores "
              f"({r['web_cpu'] / max(1, r['total']) * 1000:.1f} ms CPU per poll); "
              + (f"PostgreSQL {r['pg_cpu'] / cap:.1%}; " if r["backend"] == "postgresql" else "")
              + f"this client {r['client_cpu'] / cap:.1%}; load average {r['load_before'][0]:.1f} before the "
              f"window, {r['load'][0]:.1f} at the end")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` gives small defaults that explicit values override."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--jobs", type=int)
    p.add_argument("--metrics", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--admins", type=int, default=50)
    p.add_argument("--watchers", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="small data and 10 s, to check the harness")
    args = p.parse_args(argv)
    for name, default in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not (1 <= args.duration <= 600 and 0 <= args.admins <= 200 and 1 <= args.watchers <= 200):
        p.error("need 1 <= --duration <= 600, 0 <= --admins <= 200 and 1 <= --watchers <= 200")
    if args.jobs < 1000 or args.metrics < poll_data.TARGET_STEPS + poll_data.TARGET_EPOCHS:
        p.error(f"need --jobs >= 1000 and --metrics >= {poll_data.TARGET_STEPS + poll_data.TARGET_EPOCHS}")
    return args


def main(argv=None) -> int:
    """Measure each chosen database and print the report; 1 if any poll failed."""
    args = parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [measure(b, args.jobs, args.metrics, args.duration, args.admins, args.watchers) for b in backends]
    print_report(results, args.duration)
    return 1 if any(t.errors for r in results for t in r["tallies"]) else 0


if __name__ == "__main__":
    sys.exit(main())
