"""The admin dashboard and its API: admins only (404 for others), counts by state, workers, running jobs, usage; polls write nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from app.db import session_scope
from app.jobs.attempts import claim
from app.jobs.states import transition
from app.models import Attempt, Job, JobEvent, User, utcnow
from tests.conftest import submit_unpublished
from tests.web.test_pages import MLP, PASSWORD, person, sign_in  # noqa: F401 - person is a fixture
from tests.web.test_polls import WRITES, statements


@pytest.fixture
def running_job(database_url, settings):
    """Factory: a job a worker is running (submitted and claimed through the services, then moved
    on 90 s) and a failed one. The rows are removed afterwards: the database is shared with the
    reaper's tests, which must not find a foreign live lease."""
    created: list[int] = []

    def _make(email: str) -> int:
        now = utcnow()
        with session_scope(database_url) as s:
            owner_id = s.execute(select(User.id).where(User.email == email)).scalar_one()
        job_id, failed_id = submit_unpublished(settings, owner_id, MLP), submit_unpublished(settings, owner_id, MLP)
        created.extend([job_id, failed_id])
        with session_scope(database_url, write=True) as s:
            claim(session=s, job_id=job_id, token=0, worker="gpu0@host-a", host="host-a", pid=4242, lease_seconds=60)
            s.execute(update(Job).where(Job.id == job_id).values(
                name="busy-mlp", progress=0.42, epoch=3, step=120, started_at=now - timedelta(seconds=90)))
            s.execute(update(Attempt).where(Attempt.job_id == job_id).values(
                started_at=now - timedelta(seconds=90), heartbeat_at=now - timedelta(seconds=2)))
            transition(s, failed_id, to="failed", expect="queued", values={
                "name": "broken", "error_class": "user_error", "error_message": "column 'y' is not numeric"})
        return job_id

    yield _make
    with session_scope(database_url) as s:
        s.execute(delete(Attempt).where(Attempt.job_id.in_(created)))
        s.execute(delete(JobEvent).where(JobEvent.job_id.in_(created)))
        s.execute(delete(Job).where(Job.id.in_(created)))


def test_users_and_viewers_get_404_on_the_dashboard_and_its_api(client, person):
    for role in ("user", "viewer"):
        email, headers = person(role)
        assert client.get("/api/v1/admin/overview", headers=headers).status_code == 404
        browser = client.application.test_client()
        sign_in(browser, email, PASSWORD)
        assert browser.get("/admin").status_code == 404 and browser.get("/admin/overview").status_code == 404
        assert 'href="/admin"' not in browser.get("/jobs").get_data(as_text=True)


def test_an_admin_sees_states_queues_workers_running_jobs_failures_and_usage(client, person, running_job, settings):
    admin_email, admin = person("admin")
    user_email, user = person()
    with session_scope(settings.database_url) as s:
        user_id = s.execute(select(User.id).where(User.email == user_email)).scalar_one()
    queued = submit_unpublished(settings, user_id, MLP)  # stays queued: no worker hears of it
    job_id = running_job(user_email)
    data = client.get("/api/v1/admin/overview", headers=admin).get_json()
    assert data["jobs_by_state"]["running"] >= 1 and data["jobs_by_state"]["queued"] >= 1
    train = next(q for q in data["queues"] if q["name"] == "train")
    assert train["queued_jobs"] >= 1 and train["oldest_wait_seconds"] >= 0 and isinstance(train["depth"], int)
    worker = next(w for w in data["workers"] if w["job_id"] == job_id)
    assert worker["worker"] == "gpu0@host-a" and worker["host"] == "host-a" and worker["heartbeat_age_seconds"] >= 1
    assert any(r["id"] == job_id and r["progress"] == 0.42 for r in data["running"])
    assert any(f["error_class"] == "user_error" and "not numeric" in f["error_message"] for f in data["recent_failures"])
    usage = next(u for u in data["usage"] if u["email"] == user_email)
    assert usage["jobs"] == 3 and usage["attempts"] == 1 and 85 <= usage["compute_seconds"] < 3600
    sign_in(client, admin_email, PASSWORD)
    page = client.get("/admin").get_data(as_text=True)
    assert 'href="/admin"' in page and 'hx-get="/admin/overview"' in page and 'hx-trigger="every 5s"' in page
    for heading in ("Jobs by state", "Queues", "Workers online", "Running jobs", "Recent failures", "Usage per user"):
        assert heading in page
    assert "gpu0@host-a" in page and f"#{job_id} busy-mlp" in page and f"#{queued}" not in page.split("Running jobs")[1].split("Recent")[0]
    assert 'value="0.42"' in page and "column &#39;y&#39; is not numeric" in page


def test_a_poll_of_the_dashboard_writes_nothing(client, person, settings):
    admin_email, admin = person("admin")
    sign_in(client, admin_email, PASSWORD)
    client.get("/api/v1/admin/overview", headers=admin)  # the token's first use is recorded here
    with statements(settings) as (seen, commits):
        assert client.get("/admin/overview", headers={"HX-Request": "true"}).status_code == 200
        assert client.get("/api/v1/admin/overview", headers=admin).status_code == 200
    assert seen and [s for s in seen if s in WRITES] == [] and commits == []
