"""The partials the pages poll (a jobs-list row, a job's status panel, the admin panel): an ETag from the
API's versions, a 304 decided before any template renders, a new ETag when what they show changes,
and no query a poll of the API does not run."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import timedelta

import pytest
from flask import template_rendered
from sqlalchemy import select, update

from app.db import session_scope
from app.jobs import overview
from app.models import User, utcnow
from tests.conftest import submit_unpublished
from tests.web.test_pages import MLP, PASSWORD, person, sign_in  # noqa: F401 - person is a fixture

PARTIALS = ("/jobs/{id}/row", "/jobs/{id}/status")
HTMX = {"HX-Request": "true"}


@contextmanager
def renders(app):
    """The names of the templates rendered inside the block."""
    names: list[str] = []

    def record(_sender, template, context, **_extra):
        names.append(template.name)

    template_rendered.connect(record, app)
    try:
        yield names
    finally:
        template_rendered.disconnect(record, app)


def _user_id(settings, email: str) -> int:
    with session_scope(settings.database_url) as s:
        return s.execute(select(User.id).where(User.email == email)).scalar_one()


@pytest.fixture
def watcher(client, person, settings):
    """A signed-in user with a queued job of their own (recorded unpublished: no worker takes it)."""
    email, headers = person()
    job_id = submit_unpublished(settings, _user_id(settings, email), MLP)
    sign_in(client, email, PASSWORD)
    return email, headers, job_id


@pytest.mark.parametrize("path", PARTIALS)
def test_an_unchanged_partial_is_a_304_decided_before_any_template_renders(client, app, watcher, path):
    _, _, job_id = watcher
    url = path.format(id=job_id)
    first = client.get(url, headers=HTMX)
    tag = first.headers["ETag"]
    assert first.status_code == 200 and "no-cache" in first.headers["Cache-Control"]
    assert f'data-version="{tag.strip(chr(34))}"' in first.get_data(as_text=True)
    with renders(app) as rendered:
        again = client.get(url, headers={**HTMX, "If-None-Match": tag})
    assert again.status_code == 304 and again.get_data() == b"" and again.headers["ETag"] == tag
    assert rendered == [] and "no-cache" in again.headers["Cache-Control"]
    with renders(app) as rendered:  # a stale tag gets the body
        assert client.get(url, headers={**HTMX, "If-None-Match": '"stale"'}).status_code == 200
    assert rendered


@pytest.mark.parametrize("path", PARTIALS)
def test_a_changed_job_gets_a_new_etag_and_the_new_state(client, watcher, path):
    _, headers, job_id = watcher
    url = path.format(id=job_id)
    tag = client.get(url, headers=HTMX).headers["ETag"]
    assert client.post(f"/api/v1/jobs/{job_id}/pause", headers=headers).status_code == 202
    changed = client.get(url, headers={**HTMX, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    assert 'data-state="paused"' in changed.get_data(as_text=True)


def test_who_looks_is_part_of_the_status_etag(client, watcher, settings):
    email, _, job_id = watcher
    url = f"/jobs/{job_id}/status"
    first = client.get(url, headers=HTMX)
    assert ">Cancel<" in first.get_data(as_text=True)
    with session_scope(settings.database_url) as s:  # the owner becomes a viewer: no buttons any more
        s.execute(update(User).where(User.email == email).values(role="viewer"))
    changed = client.get(url, headers={**HTMX, "If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and ">Cancel<" not in changed.get_data(as_text=True)


def test_a_304_poll_runs_no_query_the_api_does_not(client, watcher, settings):
    _, headers, job_id = watcher
    page_tag = client.get(f"/jobs/{job_id}/status", headers=HTMX).headers["ETag"]
    api_tag = client.get(f"/api/v1/jobs/{job_id}", headers=headers).headers["ETag"]

    def job_reads(url, request_headers) -> list[str]:
        with statements_text(settings) as seen:
            assert client.get(url, headers=request_headers).status_code == 304
        # Signing in differs (a session's user, a bearer token): compare what reads the job.
        return [s for s in seen if "jobs" in s]

    page = job_reads(f"/jobs/{job_id}/status", {**HTMX, "If-None-Match": page_tag})
    api = job_reads(f"/api/v1/jobs/{job_id}", {**headers, "If-None-Match": api_tag})
    # The API reads the same version columns, in the one statement that also resolves its token
    # (app/web/revalidate.py): the page's version query, as the API's select list and join.
    assert len(page) == 1 and len(api) == 1, (page, api)
    columns = page[0].removeprefix("SELECT ").split(" FROM jobs WHERE ")[0]
    assert columns.startswith("jobs.updated_at, (SELECT max(metrics.id)") and columns in api[0], (page, api)
    assert "LEFT OUTER JOIN jobs ON jobs.id = " in api[0]


@contextmanager
def statements_text(settings):
    """The SQL text of every statement the app runs inside the block."""
    from app.db import get_engine
    from sqlalchemy import event

    seen: list[str] = []

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(" ".join(statement.split()))

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


@pytest.fixture
def fixed_overview_clock(monkeypatch):
    """The overview's clock and broker depths held still, so its version changes only with the jobs."""
    now = utcnow()
    monkeypatch.setattr(overview, "utcnow", lambda: now)
    monkeypatch.setattr(overview, "queue_depths", lambda settings: dict.fromkeys(overview.QUEUES, 0))
    return now


def test_the_admin_panel_is_a_304_until_a_job_changes_and_open_dashboards_share_one_computation(
        app, person, settings, fixed_overview_clock, monkeypatch):
    admin_email, admin_headers = person("admin")
    user_email, _ = person()
    dashboards = [app.test_client() for _ in range(3)]
    for browser in dashboards:
        sign_in(browser, admin_email, PASSWORD)
    submit_unpublished(settings, _user_id(settings, user_email), MLP)  # a version no dashboard has seen

    computed = []
    real = overview.overview
    monkeypatch.setattr(overview, "overview", lambda **kw: computed.append(1) or real(**kw))
    answers = [browser.get("/admin/overview", headers=HTMX) for browser in dashboards]
    assert [a.status_code for a in answers] == [200, 200, 200] and len(computed) == 1
    tag = answers[0].headers["ETag"]
    assert {a.headers["ETag"] for a in answers} == {tag}
    api = dashboards[0].get("/api/v1/admin/overview", headers=admin_headers)
    assert api.status_code == 200 and len(computed) == 1  # the API's poll shares the computation too

    with renders(app) as rendered:
        again = dashboards[1].get("/admin/overview", headers={**HTMX, "If-None-Match": tag})
        api_again = dashboards[1].get("/api/v1/admin/overview",
                                      headers={**admin_headers, "If-None-Match": api.headers["ETag"]})
    assert again.status_code == 304 and api_again.status_code == 304 and rendered == [] and len(computed) == 1

    job_id = submit_unpublished(settings, _user_id(settings, user_email), MLP)  # a new job changes it
    changed = dashboards[1].get("/admin/overview", headers={**HTMX, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag and len(computed) == 2
    queued = re.search(r'data-state="queued"><strong>(\d+)</strong>', changed.get_data(as_text=True))
    assert queued and int(queued.group(1)) >= 2 and job_id


def test_the_overview_version_moves_with_the_clock_window_and_the_running_jobs(session, settings, monkeypatch):
    monkeypatch.setattr(overview, "queue_depths", lambda settings: dict.fromkeys(overview.QUEUES, 0))
    now = utcnow()
    window = overview.RECOUNT_SECONDS
    start = now - timedelta(seconds=now.timestamp() % window)  # the start of this window
    same = overview.version(session=session, settings=settings, now=start + timedelta(seconds=window - 1))
    assert overview.version(session=session, settings=settings, now=start) == same
    assert overview.version(session=session, settings=settings, now=start + timedelta(seconds=window)) != same
